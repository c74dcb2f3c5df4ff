"""GenEval prompts: the official metadata format, its validation, and GenEval's generators over shapes.

GenEval (Ghosh, Hajishirzi & Schmidt, "GenEval: An Object-Focused Framework for Evaluating Text-to-Image
Alignment", NeurIPS 2023), reference code djghosh13/geneval @ af4902f24d3ca90ebbb446dd9891a59e0f82725f
(`prompts/create_prompts.py`, `prompts/evaluation_metadata.jsonl`). Re-implemented from that code's
behaviour, not copied.

One prompt is a dict ``{"tag", "include", ["exclude"], "prompt"}``:

* ``tag``: one of :data:`CATEGORIES`.
* ``include``: clauses ANDed together, each ``{"class", "count", ["color"], ["position": [rel, index]]}``;
  ``position`` says this clause's objects must stand ``rel`` of the objects of include clause ``index``.
* ``exclude``: clauses ``{"class", "count"}``; the image fails if ``count`` or more are detected.

The generators are GenEval's, with the same random draws in the same order (:func:`generate_suite` given
the 80 COCO names, seed 43 and n = 100 reproduces the official 553-prompt file line for line; a test checks
this): "a photo of a/an {obj}" for every class; "{A} and {B}" (distinct classes); "{two|three|four}
{plural}" with include count n and exclude count n + 1; "a/an {colour} {obj}"; "{A} {rel} {B}" with B
listed first and A carrying ``position = [rel, 0]``; "a/an {c1} {A} and a/an {c2} {B}" (distinct classes,
distinct colours); then de-duplication, keeping the first of identical prompts.

Deviations from GenEval, all forced by the shape vocabulary:

* The COCO classes are replaced by :data:`SHAPES`. GenEval skips "person" in the colour tasks (by
  shifting the drawn index past it); there is no person among the shapes, so :func:`shape_prompts` draws
  over all classes (``no_color_class=None``).
* n per task: GenEval draws 100 per task over 80 classes. Six shapes give only 30 ordered pairs, 18
  counting prompts, 60 coloured objects, 120 positions and 2700 colour attributions, so 100 draws would be
  mostly duplicates; :data:`N_PER_TASK` = 32 draws per task, which after de-duplication gives
  6 single_object, 21 two_object, 16 counting, 24 colors, 29 position and 32 color_attr prompts
  (128 prompts; seed 43 as in GenEval).
* "cross" is drawn as a diagonal cross (an X): an upright plus sign drawn 7 px wide is hard to tell from a
  circle (see ``render.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from bench import BenchError

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# GenEval's colour names, in its order (create_prompts.py and evaluate_images.py use the same list).
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
# GenEval's four relations; the evaluator's position rule gives each its meaning (y points down).
RELATIONS = ("left of", "right of", "above", "below")
# Shapes that the programmatic detector tells apart at 32x32 with 7-10 px objects (detect.py).
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
# Draws per task for the shape suite (GenEval: 100 over 80 classes); see the module docstring.
N_PER_TASK = 32
SEED = 43  # create_prompts.py's default --seed
# create_prompts.py spells counts with this list and draws n in [2, 4] (max_count = 4).
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
MAX_COUNT = 4


def with_article(word: str) -> str:
    """GenEval's article rule: "an" before a vowel letter, else "a"."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def plural(word: str) -> str:
    """GenEval's plural rule: "-es" after a final "s", else "-s" ("crosses", "circles")."""
    return word + ("es" if word.endswith("s") else "s")


# ---------------------------------------------------------------------------------------------- generators
# Each mirrors one generator of create_prompts.py: same draws from the generator, in the same order.

def _draw_class(rng: np.random.Generator, classes: Sequence[str], skip: str | None, size: int | None = None):
    """Class indices for the colour tasks: GenEval draws over all classes but ``skip`` (its "person")
    by drawing from n - 1 and shifting past the skipped index."""
    n = len(classes)
    if skip is None:
        return rng.choice(n, size=size, replace=False) if size else rng.choice(n)
    offset = classes.index(skip)
    idx = (rng.choice(n - 1, size=size, replace=False) if size else rng.choice(n - 1)) + 1
    return (idx + offset) % n


def _single_objects(rng, classes):
    return [{"tag": "single_object", "include": [{"class": classes[i], "count": 1}],
             "prompt": f"a photo of {with_article(classes[i])}"}
            for i in rng.choice(len(classes), size=len(classes), replace=False)]


def _two_object(rng, classes):
    a, b = (classes[i] for i in rng.choice(len(classes), size=2, replace=False))
    return {"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
            "prompt": f"a photo of {with_article(a)} and {with_article(b)}"}


def _counting(rng, classes):
    name = classes[rng.choice(len(classes))]
    n = int(rng.integers(2, MAX_COUNT, endpoint=True))
    return {"tag": "counting", "include": [{"class": name, "count": n}],
            "exclude": [{"class": name, "count": n + 1}],
            "prompt": f"a photo of {NUMBERS[n]} {plural(name)}"}


def _colors(rng, classes, skip):
    name = classes[_draw_class(rng, classes, skip)]
    color = COLORS[rng.choice(len(COLORS))]
    return {"tag": "colors", "include": [{"class": name, "count": 1, "color": color}],
            "prompt": f"a photo of {with_article(color)} {name}"}


def _position(rng, classes):
    a, b = (classes[i] for i in rng.choice(len(classes), size=2, replace=False))
    rel = RELATIONS[rng.choice(len(RELATIONS))]
    # B is listed first so that A's clause can point at it (index 0).
    return {"tag": "position",
            "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
            "prompt": f"a photo of {with_article(a)} {rel} {with_article(b)}"}


def _color_attr(rng, classes, skip):
    a, b = (classes[i] for i in _draw_class(rng, classes, skip, size=2))
    ca, cb = (COLORS[i] for i in rng.choice(len(COLORS), size=2, replace=False))
    return {"tag": "color_attr",
            "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
            "prompt": f"a photo of {with_article(ca)} {a} and {with_article(cb)} {b}"}


def _dedup(samples: Iterable[dict]) -> list[dict]:
    """Keep the first of identical prompts. GenEval compares yaml.safe_dump texts (sorted keys, tuples as
    lists); sorted-key JSON is the same equivalence."""
    seen, out = set(), []
    for s in samples:
        key = json.dumps(s, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def generate_suite(classes: Sequence[str], seed: int = SEED, n: int = 100,
                   no_color_class: str | None = None) -> list[dict]:
    """GenEval's evaluation suite over ``classes``: every class once, then ``n`` draws of each other task,
    de-duplicated. ``no_color_class`` is the class the colour tasks never name (GenEval: "person")."""
    classes = list(classes)
    if no_color_class is not None and no_color_class not in classes:
        raise BenchError(f"no_color_class {no_color_class!r} is not one of the classes {classes}")
    if len(classes) < 2:
        raise BenchError(f"GenEval prompts need at least 2 classes, got {classes}")
    rng = np.random.default_rng(seed)
    samples = _single_objects(rng, classes)
    samples += [_two_object(rng, classes) for _ in range(n)]
    samples += [_counting(rng, classes) for _ in range(n)]
    samples += [_colors(rng, classes, no_color_class) for _ in range(n)]
    samples += [_position(rng, classes) for _ in range(n)]
    samples += [_color_attr(rng, classes, no_color_class) for _ in range(n)]
    return _dedup(samples)


def shape_prompts(shapes: Sequence[str] = SHAPES, seed: int = SEED,
                  n_per_task: int = N_PER_TASK) -> list[dict]:
    """The evaluation prompts of the shape task: GenEval's suite with the shapes as classes."""
    return generate_suite(shapes, seed=seed, n=n_per_task)


def train_prompts(rng: np.random.Generator, n: int, shapes: Sequence[str] = SHAPES,
                  tags: Sequence[str] = CATEGORIES) -> list[dict]:
    """``n`` random prompts for training a generator, each of a tag drawn uniformly from ``tags``, made by
    the same generators (same schema and templates); no de-duplication, so frequent prompts repeat."""
    unknown = [t for t in tags if t not in CATEGORIES]
    if unknown:
        raise BenchError(f"unknown GenEval tags {unknown}; valid: {', '.join(CATEGORIES)}")
    shapes = list(shapes)
    make = {
        "single_object": lambda: _single_objects(rng, shapes)[0],
        "two_object": lambda: _two_object(rng, shapes),
        "counting": lambda: _counting(rng, shapes),
        "colors": lambda: _colors(rng, shapes, None),
        "position": lambda: _position(rng, shapes),
        "color_attr": lambda: _color_attr(rng, shapes, None),
    }
    return [make[tags[int(rng.integers(len(tags)))]]() for _ in range(n)]


# ---------------------------------------------------------------------------------------------- validation

_FORMAT = ('one JSON object per line: {"tag": <one of ' + ", ".join(CATEGORIES) + '>, "include": '
           '[{"class": str, "count": int >= 1, optional "color", optional "position": [relation, index]}], '
           'optional "exclude": [{"class": str, "count": int >= 1}], "prompt": str}')


def _clause_error(where: str, clause, i: int, kind: str, classes: Sequence[str] | None) -> str | None:
    """Why ``clause`` (the i-th of an include/exclude list) is invalid, or None."""
    if not isinstance(clause, dict):
        return f"{where}: {kind}[{i}] must be an object with 'class' and 'count', got {clause!r}"
    allowed = {"class", "count", "color", "position"} if kind == "include" else {"class", "count"}
    extra = sorted(set(clause) - allowed)
    if extra:
        return f"{where}: {kind}[{i}] has unknown field(s) {extra}; valid: {sorted(allowed)}"
    name = clause.get("class")
    if not isinstance(name, str) or not name:
        return f"{where}: {kind}[{i}].class must be a non-empty string, got {name!r}"
    if classes is not None and name not in classes:
        return f"{where}: {kind}[{i}].class {name!r} is not a known class; valid: {', '.join(classes)}"
    count = clause.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        return f"{where}: {kind}[{i}].count must be an integer >= 1, got {count!r}"
    if "color" in clause and clause["color"] not in COLORS:
        return f"{where}: {kind}[{i}].color {clause['color']!r} is not one of {', '.join(COLORS)}"
    if "position" in clause:
        pos = clause["position"]
        if (not isinstance(pos, (list, tuple)) or len(pos) != 2 or pos[0] not in RELATIONS
                or not isinstance(pos[1], int) or isinstance(pos[1], bool) or not 0 <= pos[1] < i):
            return (f"{where}: {kind}[{i}].position must be [relation, index] with relation one of "
                    f"{', '.join(RELATIONS)} and index an earlier include clause (0..{i - 1}), got {pos!r}")
    return None


def validate_prompt(meta, where: str, classes: Sequence[str] | None = None) -> None:
    """Raise BenchError (prefixed by ``where``) unless ``meta`` is one valid GenEval prompt."""
    if not isinstance(meta, dict):
        raise BenchError(f"{where}: expected a JSON object, got {type(meta).__name__}; {_FORMAT}")
    extra = sorted(set(meta) - {"tag", "include", "exclude", "prompt"})
    if extra:
        raise BenchError(f"{where}: unknown field(s) {extra}; {_FORMAT}")
    for field in ("tag", "include", "prompt"):
        if field not in meta:
            raise BenchError(f"{where}: missing field {field!r}; {_FORMAT}")
    if meta["tag"] not in CATEGORIES:
        raise BenchError(f"{where}: field 'tag' is {meta['tag']!r}; valid: {', '.join(CATEGORIES)}")
    if not isinstance(meta["prompt"], str) or not meta["prompt"]:
        raise BenchError(f"{where}: field 'prompt' must be a non-empty string, got {meta['prompt']!r}")
    for kind in ("include", "exclude"):
        if kind not in meta:
            continue
        clauses = meta[kind]
        if not isinstance(clauses, list) or (kind == "include" and not clauses):
            raise BenchError(f"{where}: field {kind!r} must be a{' non-empty' if kind == 'include' else ''} "
                             f"list of clauses, got {clauses!r}; {_FORMAT}")
        for i, clause in enumerate(clauses):
            err = _clause_error(where, clause, i, kind, classes)
            if err:
                raise BenchError(err)


def load_metadata(path: str | Path, classes: Sequence[str] | None = None) -> list[dict]:
    """Read and validate a GenEval ``evaluation_metadata.jsonl`` (the official file or one of ours).

    ``classes``, if given, is the vocabulary every clause's class must come from. Any problem raises
    BenchError naming the file, the line, the field and what would be valid."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"{path}: GenEval metadata file not found (expected {_FORMAT})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BenchError(f"{path}: not UTF-8 text ({e}); expected {_FORMAT}") from None
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise BenchError(f"{path}: empty file; expected {_FORMAT}")
    out = []
    for lineno, line in enumerate(lines, 1):
        where = f"{path}:{lineno}"
        if not line.strip():
            # GenEval's generation script json-parses every line, so a blank line would break it (and
            # would shift the prompt numbering of the output folders).
            raise BenchError(f"{where}: blank line; expected {_FORMAT}")
        try:
            meta = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchError(f"{where}: not JSON ({e.msg}); expected {_FORMAT}") from None
        validate_prompt(meta, where, classes)
        out.append(meta)
    return out
