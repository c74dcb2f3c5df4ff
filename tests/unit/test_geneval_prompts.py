"""GenEval prompts: the official metadata file, its validation, and GenEval's generators over shapes."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bench import BenchError
from bench.tasks.geneval.prompts import (
    CATEGORIES, COLORS, N_PER_TASK, RELATIONS, SHAPES, generate_suite, load_metadata, plural, shape_prompts,
    train_prompts, validate_prompt, with_article,
)

REPO = Path(__file__).resolve().parents[2]
# The counts per tag of the official prompt file (docs/reference/diffusion.md, section 4.1).
OFFICIAL_COUNTS = {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100,
                   "color_attr": 100}


@pytest.fixture(scope="module")
def geneval_data() -> Path:
    root = Path(os.environ.get("BENCH_DATA") or REPO.parent / "shared" / "data") / "geneval"
    if not (root / "evaluation_metadata.jsonl").is_file() or not (root / "object_names.txt").is_file():
        pytest.skip(f"GenEval's official prompt files not found under {root} (set BENCH_DATA to the data "
                    f"root)")
    return root


def coco_names(root: Path) -> list[str]:
    return [line.strip() for line in (root / "object_names.txt").read_text().splitlines() if line.strip()]


def test_official_file_loads_with_the_reference_counts(geneval_data):
    metas = load_metadata(geneval_data / "evaluation_metadata.jsonl", classes=coco_names(geneval_data))
    assert len(metas) == 553
    assert Counter(m["tag"] for m in metas) == OFFICIAL_COUNTS


def test_generators_reproduce_the_official_file_line_for_line(geneval_data):
    """Our generators, given GenEval's classes, seed and n, draw exactly GenEval's 553 prompts."""
    lines = (geneval_data / "evaluation_metadata.jsonl").read_text().splitlines()
    suite = generate_suite(coco_names(geneval_data), seed=43, n=100, no_color_class="person")
    assert [json.dumps(m) for m in suite] == lines


def test_shape_suite_sizes_schema_and_determinism():
    prompts = shape_prompts()
    assert Counter(p["tag"] for p in prompts) == {"single_object": 6, "two_object": 21, "counting": 16,
                                                  "colors": 24, "position": 29, "color_attr": 32}
    assert prompts == shape_prompts(seed=43, n_per_task=N_PER_TASK)
    assert prompts != shape_prompts(seed=44)
    keys = [json.dumps(p, sort_keys=True) for p in prompts]
    assert len(set(keys)) == len(keys)  # de-duplicated
    for i, p in enumerate(prompts):
        validate_prompt(p, f"prompt {i}", classes=SHAPES)
    assert sorted(p["include"][0]["class"] for p in prompts if p["tag"] == "single_object") == sorted(SHAPES)


def test_shape_suite_follows_geneval_templates():
    for p in shape_prompts():
        inc = p["include"]
        if p["tag"] == "counting":
            (c,), (e,) = inc, p["exclude"]
            assert 2 <= c["count"] <= 4 and e == {"class": c["class"], "count": c["count"] + 1}
            number = ["two", "three", "four"][c["count"] - 2]
            assert p["prompt"] == f"a photo of {number} {plural(c['class'])}"
        elif p["tag"] == "position":
            b, a = inc
            rel, target = a["position"]
            assert target == 0 and rel in RELATIONS and a["class"] != b["class"]
            assert p["prompt"] == f"a photo of {with_article(a['class'])} {rel} {with_article(b['class'])}"
        elif p["tag"] == "color_attr":
            a, b = inc
            assert a["class"] != b["class"] and a["color"] != b["color"]
            assert p["prompt"] == (f"a photo of {with_article(a['color'])} {a['class']} and "
                                   f"{with_article(b['color'])} {b['class']}")
        elif p["tag"] == "colors":
            assert p["prompt"] == f"a photo of {with_article(inc[0]['color'])} {inc[0]['class']}"
    assert with_article("orange") == "an orange" and with_article("ring") == "a ring"
    assert plural("cross") == "crosses" and plural("circle") == "circles"


def test_train_prompts_are_valid_seeded_and_cover_every_kind():
    a = train_prompts(np.random.default_rng(0), 300)
    assert a == train_prompts(np.random.default_rng(0), 300)
    assert a != train_prompts(np.random.default_rng(1), 300)
    assert set(p["tag"] for p in a) == set(CATEGORIES)
    for i, p in enumerate(a):
        validate_prompt(p, f"train prompt {i}", classes=SHAPES)
    assert {p["tag"] for p in train_prompts(np.random.default_rng(0), 20, tags=("counting",))} == {"counting"}
    with pytest.raises(BenchError, match="unknown GenEval tags"):
        train_prompts(np.random.default_rng(0), 2, tags=("counting", "spatial"))


GOOD = ('{"tag": "single_object", "include": [{"class": "circle", "count": 1}], '
        '"prompt": "a photo of a circle"}')


@pytest.mark.parametrize("text, needle", [
    ("", "empty file"),
    ("tag,include,prompt\nsingle_object,circle,a photo of a circle\n", ":1: not JSON"),
    (GOOD + "\n[1, 2]\n", ":2: expected a JSON object"),
    (GOOD + "\n\n" + GOOD + "\n", ":2: blank line"),
    ('{"tag": "single_object", "prompt": "x"}\n', ":1: missing field 'include'"),
    ('{"include": [{"class": "circle", "count": 1}], "prompt": "x"}\n', ":1: missing field 'tag'"),
    ('{"tag": "spatial", "include": [{"class": "circle", "count": 1}], "prompt": "x"}\n',
     ":1: field 'tag' is 'spatial'; valid: single_object"),
    ('{"tag": "colors", "include": [], "prompt": "x"}\n', ":1: field 'include' must be a non-empty list"),
    ('{"tag": "colors", "include": [{"class": "circle", "count": 0}], "prompt": "x"}\n',
     ":1: include[0].count must be an integer >= 1"),
    ('{"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "teal"}], "prompt": "x"}\n',
     ":1: include[0].color 'teal' is not one of red"),
    ('{"tag": "position", "include": [{"class": "circle", "count": 1, "position": ["left of", 0]}], '
     '"prompt": "x"}\n', ":1: include[0].position must be [relation, index]"),
    ('{"tag": "position", "include": [{"class": "circle", "count": 1}, {"class": "ring", "count": 1, '
     '"position": ["beside", 0]}], "prompt": "x"}\n', "include[1].position must be [relation, index]"),
    ('{"tag": "counting", "include": [{"class": "circle", "count": 2}], "exclude": [{"class": "circle"}], '
     '"prompt": "x"}\n', ":1: exclude[0].count must be an integer"),
    ('{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "x", "seed": 1}\n',
     ":1: unknown field(s) ['seed']"),
    ('{"tag": "single_object", "include": [{"class": "circle", "count": 1}]}\n', "missing field 'prompt'"),
    (GOOD + "\n" + GOOD.replace("circle", "hexagon") + "\n", ":2: include[0].class 'hexagon' is not a known"),
])
def test_bad_metadata_files_name_the_file_line_and_field(tmp_path, text, needle):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text(text)
    with pytest.raises(BenchError) as err:
        load_metadata(path, classes=SHAPES)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_good_file_round_trips_and_missing_file_is_reported(tmp_path):
    path = tmp_path / "meta.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in shape_prompts()))
    assert load_metadata(path, classes=SHAPES) == shape_prompts()
    with pytest.raises(BenchError, match="not found"):
        load_metadata(tmp_path / "nope.jsonl")
    assert COLORS[0] == "red" and len(COLORS) == 10
