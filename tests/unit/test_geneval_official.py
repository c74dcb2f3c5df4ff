"""GenEval's on-disk formats: the generation layout and the evaluator's results file, round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from bench import BenchError
from bench.tasks.geneval.official import (
    RESULT_FIELDS, evaluate_layout, read_official_results, write_official_layout, write_results,
)
from bench.tasks.geneval.prompts import shape_prompts
from bench.tasks.geneval.render import render
from bench.tasks.geneval.rules import summarize


@pytest.fixture(scope="module")
def scenes():
    """Three prompts (one per kind that needs layout, colour, count), two ground-truth renders each."""
    prompts = shape_prompts()
    metas = [next(p for p in prompts if p["tag"] == t) for t in ("position", "color_attr", "counting")]
    rng = np.random.default_rng(0)
    return metas, [[render(m, rng)[0] for _ in range(2)] for m in metas]


def test_layout_is_exactly_geneval_generation_layout(tmp_path, scenes):
    metas, images = scenes
    out = write_official_layout(tmp_path / "gen", metas, images)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [f"{i:05d}/{name}" for i in range(3)
                     for name in ("metadata.jsonl", "samples/00000.png", "samples/00001.png")]
    # metadata.jsonl holds the prompt's line of evaluation_metadata.jsonl (json.dump: no newline).
    assert (out / "00001" / "metadata.jsonl").read_text() == json.dumps(metas[1])
    assert np.array_equal(np.asarray(Image.open(out / "00002" / "samples" / "00001.png")), images[2][1])
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left


def test_round_trip_through_the_official_results_format(tmp_path, scenes):
    metas, images = scenes
    folder = write_official_layout(tmp_path / "gen", metas, images)
    results = evaluate_layout(folder)
    assert len(results) == 6 and all(r["correct"] for r in results)
    assert results[0]["filename"] == str(folder / "00000" / "samples" / "00000.png")
    path = write_results(tmp_path / "results" / "results.jsonl", results)
    back = read_official_results(path)
    assert [{k: r[k] for k in RESULT_FIELDS} for r in results] == back
    s = summarize(back)
    assert s["position"] == s["color_attr"] == s["counting"] == s["overall"] == 1.0
    assert s["n_prompts"] == 3 and s["n_images"] == 6


def test_reads_the_file_pandas_writes_for_the_official_evaluator(tmp_path, scenes):
    pd = pytest.importorskip("pandas")
    metas, images = scenes
    results = evaluate_layout(write_official_layout(tmp_path / "gen", metas, images))
    results[0]["correct"] = False
    path = tmp_path / "results.jsonl"
    with open(path, "w") as fp:  # exactly how evaluate_images.py saves its results
        pd.DataFrame(results).to_json(fp, orient="records", lines=True)
    back = read_official_results(path)
    assert [r["filename"] for r in back] == [r["filename"] for r in results]  # pandas escapes "/" as "\/"
    s = summarize(back)
    assert s["position"] == 0.5 and s["correct_images"] == pytest.approx(5 / 6)
    assert s["correct_prompts"] == 1.0


def test_layout_refuses_bad_input_and_writes_nothing(tmp_path, scenes):
    metas, images = scenes
    with pytest.raises(BenchError, match="3 prompts but images for 2"):
        write_official_layout(tmp_path / "a", metas, images[:2])
    bad = [images[0], [images[1][0].astype(np.float32)], images[2]]
    with pytest.raises(BenchError, match="prompt 1 image 0: expected a uint8"):
        write_official_layout(tmp_path / "b", metas, bad)
    with pytest.raises(BenchError, match="prompt 0: field 'tag'"):
        write_official_layout(tmp_path / "c", [{**metas[0], "tag": "spatial"}] + metas[1:], images)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old.txt").write_text("x")
    with pytest.raises(BenchError, match="not an empty folder"):
        write_official_layout(tmp_path / "d", metas, images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["old.txt"]


GOOD = {"filename": "gen/00000/samples/00000.png", "tag": "single_object", "prompt": "a photo of a circle",
        "correct": True, "reason": "",
        "metadata": json.dumps({"tag": "single_object", "include": [{"class": "circle", "count": 1}],
                                "prompt": "a photo of a circle"}), "details": "{}"}


@pytest.mark.parametrize("lines, needle", [
    ([], "empty results file"),
    (["filename,tag,correct"], ":1: not JSON"),
    ([json.dumps(GOOD), "[1]"], ":2: not a JSON object"),
    ([json.dumps({k: v for k, v in GOOD.items() if k != "correct"})], ":1: missing field 'correct'"),
    ([json.dumps({**GOOD, "correct": "yes"})], ":1: field 'correct' is 'yes'"),
    ([json.dumps({**GOOD, "tag": "spatial"})], ":1: field 'tag' is 'spatial'; valid"),
    ([json.dumps({**GOOD, "metadata": {"tag": "single_object"}})], ":1: field 'metadata' must be"),
    ([json.dumps({**GOOD, "metadata": "{not json"})], ":1: field 'metadata' is not JSON"),
    ([json.dumps({**GOOD, "tag": "counting"})], "its metadata says 'single_object'"),
    ([json.dumps({**GOOD, "metadata": json.dumps({"tag": "single_object", "prompt": "x"})})],
     ":1: field 'metadata': missing field 'include'"),
])
def test_bad_results_files_name_the_line_and_field(tmp_path, lines, needle):
    path = tmp_path / "results.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(BenchError) as err:
        read_official_results(path)
    assert str(path) in str(err.value) and needle in str(err.value)
    with pytest.raises(BenchError, match="not found"):
        read_official_results(tmp_path / "missing.jsonl")
