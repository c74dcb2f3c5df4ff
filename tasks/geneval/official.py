"""GenEval's on-disk formats, for running the official evaluator as an external command (full tier).

GenEval (Ghosh et al., NeurIPS 2023), djghosh13/geneval @ af4902f24d3ca90ebbb446dd9891a59e0f82725f.
Formats read from `generation/diffusers_generate.py` (what it writes) and `evaluation/evaluate_images.py`
(what it reads and writes); re-implemented, not copied.

Generation layout, one folder per prompt, numbered by the prompt's line in the metadata file::

    <folder>/00000/metadata.jsonl     the prompt's metadata as one JSON object (json.dump, no newline)
    <folder>/00000/samples/00000.png  its images, numbered from 0 with five digits
    <folder>/00001/...

(Five digits for the samples too: the script formats them ``f"{n:05}"``, though the README and our
reference note say four.) The evaluator walks the numeric subfolders and every ``samples/<digits>.png``,
and writes one JSON line per image with ``filename``, ``tag``, ``prompt``, ``correct``, ``reason``,
``metadata`` (the prompt's metadata, as a JSON string) and ``details`` (kept boxes per class, as a JSON
string); summary_scores.py groups prompts by the ``metadata`` string.

Deviations: :func:`write_official_layout` does not write the optional ``grid.png`` (the evaluator
ignores it); :func:`evaluate_layout` visits folders and files in sorted order (the official script in
``os.listdir`` order), and scores with our shape detector instead of Mask2Former + CLIP.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bench import BenchError

from .prompts import CATEGORIES, validate_prompt
from .rules import RULES, Rules, evaluate_detections

RESULT_FIELDS = ("filename", "tag", "prompt", "correct", "reason", "metadata", "details")
_REQUIRED = ("filename", "tag", "prompt", "correct", "metadata")


def write_official_layout(folder: str | Path, metadata: Sequence[dict],
                          images_per_prompt: Sequence[Sequence[np.ndarray]]) -> Path:
    """Write images in GenEval's generation layout under ``folder`` (which must not exist, or be empty).

    Everything is checked first and written into a temporary sibling folder that is renamed into place,
    so a bad input leaves nothing half-written."""
    from PIL import Image

    folder = Path(folder)
    if len(metadata) != len(images_per_prompt):
        raise BenchError(f"{len(metadata)} prompts but images for {len(images_per_prompt)}; "
                         f"images_per_prompt needs one list of images per prompt")
    for i, (meta, images) in enumerate(zip(metadata, images_per_prompt)):
        validate_prompt(meta, f"prompt {i}")
        if len(images) == 0:
            raise BenchError(f"prompt {i} ({meta['prompt']!r}) has no images")
        for k, img in enumerate(images):
            a = np.asarray(img)
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3:
                raise BenchError(f"prompt {i} image {k}: expected a uint8 [H, W, 3] array, "
                                 f"got {a.dtype} {a.shape}")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise BenchError(f"{folder}: already exists and is not an empty folder; choose a new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for i, (meta, images) in enumerate(zip(metadata, images_per_prompt)):
            sub = tmp / f"{i:05d}"
            (sub / "samples").mkdir(parents=True)
            (sub / "metadata.jsonl").write_text(json.dumps(meta), encoding="utf-8")
            for k, img in enumerate(images):
                Image.fromarray(np.asarray(img)).save(sub / "samples" / f"{k:05d}.png")
        if folder.exists():
            folder.rmdir()
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def iter_layout(folder: str | Path):
    """(image path, metadata) for every image of a generation layout, as the evaluator finds them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BenchError(f"{folder}: not a folder of GenEval generations (<NNNNN>/metadata.jsonl + samples/)")
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()):
        meta_path = sub / "metadata.jsonl"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise BenchError(f"{meta_path}: unreadable prompt metadata ({e})") from None
        validate_prompt(meta, str(meta_path))
        samples = sub / "samples"
        names = sorted(os.listdir(samples)) if samples.is_dir() else []
        for name in names:
            if (samples / name).is_file() and re.match(r"\d+\.png", name):
                yield os.path.join(str(folder), sub.name, "samples", name), meta


def evaluate_layout(folder: str | Path, detector: Callable | None = None, rules: Rules = RULES) -> list[dict]:
    """Score a generation layout with our detector and rules: the official evaluator's loop, offline."""
    from PIL import Image

    if detector is None:
        from .detect import detect as detector
    results = []
    for path, meta in iter_layout(folder):
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
        results.append({**evaluate_detections(meta, detector(image), rules), "filename": path})
    return results


def write_results(path: str | Path, results: Sequence[dict]) -> Path:
    """Write per-image results as the official evaluator does: one JSON object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({k: r.get(k) for k in RESULT_FIELDS}) for r in results]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(path)
    return path


def read_official_results(path: str | Path) -> list[dict]:
    """Per-image results from the JSONL that evaluate_images.py writes (its --outfile), validated; each is
    a dict with the official fields, ready for :func:`rules.summarize`."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"{path}: GenEval results file not found (evaluate_images.py --outfile)")
    expected = (f"one JSON object per line with fields {', '.join(RESULT_FIELDS)} "
                f"(as evaluate_images.py writes them)")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if not any(line.strip() for line in lines):
        raise BenchError(f"{path}: empty results file; expected {expected}")
    out = []
    for lineno, line in enumerate(lines, 1):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue  # pandas ends the file with a newline; blank lines carry no result
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchError(f"{where}: not JSON ({e.msg}); expected {expected}") from None
        if not isinstance(rec, dict):
            raise BenchError(f"{where}: not a JSON object; expected {expected}")
        for field in _REQUIRED:
            if field not in rec:
                raise BenchError(f"{where}: missing field {field!r}; expected {expected}")
        if rec["tag"] not in CATEGORIES:
            raise BenchError(f"{where}: field 'tag' is {rec['tag']!r}; valid: {', '.join(CATEGORIES)}")
        if not isinstance(rec["correct"], bool):
            raise BenchError(f"{where}: field 'correct' is {rec['correct']!r}; expected true or false")
        if not isinstance(rec["metadata"], str):
            raise BenchError(f"{where}: field 'metadata' must be the prompt's metadata as a JSON string")
        try:
            meta = json.loads(rec["metadata"])
        except json.JSONDecodeError as e:
            raise BenchError(f"{where}: field 'metadata' is not JSON ({e.msg})") from None
        validate_prompt(meta, f"{where}: field 'metadata'")
        if meta["tag"] != rec["tag"]:
            raise BenchError(f"{where}: field 'tag' is {rec['tag']!r} but its metadata says {meta['tag']!r}")
        out.append(rec)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.tasks.geneval.official IMAGES OUTFILE``: score a generation layout with the shape
    detector and GenEval's rules and write the results file in the official evaluator's format. A stand-in
    for ``evaluation/evaluate_images.py`` where its detector stack is not installed (tests; checking a layout):
    it detects the GenEval-like task's shapes, not COCO objects, so its scores are not GenEval's."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m bench.tasks.geneval.official IMAGES_FOLDER OUTFILE", file=sys.stderr)
        return 2
    try:
        write_results(args[1], evaluate_layout(args[0]))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess in the tests
    raise SystemExit(main())
