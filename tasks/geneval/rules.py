"""GenEval's scoring rules, independent of the detector that feeds them.

GenEval (Ghosh et al., NeurIPS 2023), djghosh13/geneval @ af4902f24d3ca90ebbb446dd9891a59e0f82725f,
`evaluation/evaluate_images.py` (filtering, include/colour/position/exclude rules) and
`evaluation/summary_scores.py` (aggregation). Re-implemented from that code's behaviour, not copied.

The rule engine takes detections: any objects with ``cls`` (class name), ``score`` (confidence in
[0, 1]), ``box`` (x0, y0, x1, y1 in pixels) and ``color`` (one of GenEval's ten colour names, or None
when no colour was classified). ``detect.py`` makes them from rendered shapes; a full-tier detector can
make them from photographs.

The rules, as the official evaluator applies them:

* Filtering, per class: keep detections scoring strictly above 0.3 (0.9 when the prompt's tag is
  "counting"), most confident first, at most 16, then greedy NMS at ``max_overlap`` (1.0 = off, the
  default: every kept box survives).
* Include clauses are ANDed. A clause takes the ``count`` most confident objects of its class and fails
  if there are fewer.
* Colour: at least ``count`` of those objects must have the clause's colour.
* Position (checked only when the clause's class and colour passed): every one of the clause's objects
  must stand ``rel`` of every object matched by the target clause (which must itself have matched).
  The relation comes from box centres: offset = c_A - c_B, each component shrunk towards 0 by
  0.1 * (size_A + size_B) along that axis and clipped at 0; no relation if both are then below 1e-3;
  otherwise divided by the length of the unshrunk offset, and dx < -0.5 is "left of", dx > 0.5
  "right of", dy < -0.5 "above", dy > 0.5 "below" (y points down).
* Exclude clauses: the image fails if ``count`` or more objects of the class survived filtering.
* Aggregation: a category's score is its mean image correctness; overall is the unweighted mean over the
  categories present; also the fraction of correct images and of correct prompts (a prompt is correct
  if any of its images is).

Deviations: ties in confidence keep the detector's order (GenEval reverses a numpy argsort, whose tie
order is unspecified); the colour of each object is read from the detection's ``color`` (or from a
``color_of`` callable) instead of GenEval's CLIP classification of masked crops; the ``reason`` strings
are worded differently. Scores are fractions in [0, 1], where summary_scores.py prints percentages for
the image/prompt fractions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from bench import BenchError

from .prompts import CATEGORIES


@dataclass(frozen=True)
class Rules:
    """The evaluator's tunable constants, defaults from evaluate_images.py's ``--options``."""

    threshold: float = 0.3            # 'threshold'
    counting_threshold: float = 0.9   # 'counting_threshold'
    max_objects: int = 16             # 'max_objects' (per class)
    max_overlap: float = 1.0          # 'max_overlap': NMS IoU threshold; 1.0 turns NMS off
    position_threshold: float = 0.1   # 'position_threshold': the per-axis shrink, times (size_A + size_B)


RULES = Rules()


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU with GenEval's inclusive-pixel convention (a box spans x1 - x0 + 1 pixels); used only by NMS."""
    def area(x0, y0, x1, y1):
        return max(x1 - x0 + 1, 0) * max(y1 - y0 + 1, 0)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a[:4]) + area(*b[:4]) - inter
    return inter / union if union else 0.0


def filter_detections(detections: Iterable, tag: str, rules: Rules = RULES) -> dict[str, list]:
    """Per class: above the threshold (the counting one for counting prompts), most confident first,
    at most ``max_objects``, then NMS at ``max_overlap``. Classes with nothing left are absent."""
    threshold = rules.counting_threshold if tag == "counting" else rules.threshold
    by_class: dict[str, list] = {}
    for det in detections:
        by_class.setdefault(det.cls, []).append(det)
    kept: dict[str, list] = {}
    for name, dets in by_class.items():
        ranked = sorted((d for d in dets if d.score > threshold), key=lambda d: -d.score)[:rules.max_objects]
        survivors = []
        while ranked:
            best = ranked.pop(0)
            survivors.append(best)
            if rules.max_overlap != 1:
                ranked = [d for d in ranked if box_iou(best.box, d.box) < rules.max_overlap]
        if survivors:
            kept[name] = survivors
    return kept


def relative_position(box_a: Sequence[float], box_b: Sequence[float],
                      position_threshold: float = RULES.position_threshold) -> set[str]:
    """The relations A holds to B (a subset of left of / right of / above / below), from the boxes."""
    ax0, ay0, ax1, ay1 = box_a[:4]
    bx0, by0, bx1, by1 = box_b[:4]
    offset = ((ax0 + ax1) / 2 - (bx0 + bx1) / 2, (ay0 + ay1) / 2 - (by0 + by1) / 2)
    sizes = ((ax1 - ax0) + (bx1 - bx0), (ay1 - ay0) + (by1 - by0))
    shrunk = [max(abs(o) - position_threshold * s, 0.0) * (1 if o > 0 else -1 if o < 0 else 0)
              for o, s in zip(offset, sizes)]
    if all(abs(v) < 1e-3 for v in shrunk):
        return set()
    norm = (offset[0] ** 2 + offset[1] ** 2) ** 0.5
    dx, dy = shrunk[0] / norm, shrunk[1] / norm
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def _colors(objs: list, color_of: Callable[[list], list[str]] | None) -> list:
    return list(color_of(objs)) if color_of is not None else [d.color for d in objs]


def evaluate(metadata: dict, objects: dict[str, list], rules: Rules = RULES,
             color_of: Callable[[list], list[str]] | None = None) -> tuple[bool, str]:
    """(correct, reason) for one image, given its filtered objects per class (most confident first)."""
    correct, reasons, groups = True, [], []
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = objects.get(name, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {count} {name}, found {len(found)}")
        if ok and "color" in clause:
            colors = _colors(found, color_of)
            hits = colors.count(clause["color"])
            if hits < count:
                ok = False
                reasons.append(f"expected {count} {clause['color']} {name}, found {hits} "
                               f"(colours: {', '.join(str(c) for c in colors)})")
        if ok and "position" in clause:
            rel, target = clause["position"]
            if groups[target] is None:
                ok = False
                reasons.append(f"no matched target for {name} to be {rel}")
            else:
                for obj in found:
                    for other in groups[target]:
                        rels = relative_position(obj.box, other.box, rules.position_threshold)
                        if rel not in rels:
                            ok = False
                            reasons.append(f"expected {name} {rel} its target, found "
                                           f"{' and '.join(sorted(rels)) or 'no relation'}")
                            break
                    if not ok:
                        break
        groups.append(found if ok else None)
        correct = correct and ok
    for clause in metadata.get("exclude", []):
        name, count = clause["class"], clause["count"]
        n = len(objects.get(name, []))
        if n >= count:
            correct = False
            reasons.append(f"expected fewer than {count} {name}, found {n}")
    return correct, "\n".join(reasons)


def evaluate_detections(metadata: dict, detections: Iterable, rules: Rules = RULES,
                        color_of: Callable[[list], list[str]] | None = None) -> dict:
    """One image's result, with the fields the official evaluator writes (``filename`` left None)."""
    objects = filter_detections(detections, metadata["tag"], rules)
    correct, reason = evaluate(metadata, objects, rules, color_of)
    return {
        "filename": None,
        "tag": metadata["tag"],
        "prompt": metadata["prompt"],
        "correct": bool(correct),
        "reason": reason,
        "metadata": json.dumps(metadata),
        # GenEval lists each kept box as [x0, y0, x1, y1, score] per class.
        "details": json.dumps({k: [[*map(float, d.box[:4]), float(d.score)] for d in v]
                               for k, v in objects.items()}),
    }


def summarize(results: Iterable[dict]) -> dict[str, float]:
    """Per-category accuracy, overall (unweighted mean over categories present), the fraction of correct
    images and of correct prompts; results are dicts with 'tag', 'correct' and 'metadata' (or 'prompt')
    identifying the prompt."""
    per_tag: dict[str, list[bool]] = {}
    per_prompt: dict[str, bool] = {}
    n = 0
    for r in results:
        tag = r.get("tag")
        if tag not in CATEGORIES:
            raise BenchError(f"result {n} has tag {tag!r}; valid: {', '.join(CATEGORIES)}")
        if not isinstance(r.get("correct"), bool):
            raise BenchError(f"result {n} has 'correct' = {r.get('correct')!r}; expected true or false")
        key = r.get("metadata") or r.get("prompt")
        if key is None:
            raise BenchError(f"result {n} names no prompt (needs 'metadata' or 'prompt')")
        per_tag.setdefault(tag, []).append(r["correct"])
        per_prompt[key] = per_prompt.get(key, False) or r["correct"]
        n += 1
    if not n:
        raise BenchError("no GenEval results to summarise")
    out = {tag: sum(v) / len(v) for tag in CATEGORIES if (v := per_tag.get(tag))}
    out["overall"] = sum(out.values()) / len(out)
    out["correct_images"] = sum(sum(v) for v in per_tag.values()) / n
    out["correct_prompts"] = sum(per_prompt.values()) / len(per_prompt)
    out["n_images"] = float(n)
    out["n_prompts"] = float(len(per_prompt))
    return out
