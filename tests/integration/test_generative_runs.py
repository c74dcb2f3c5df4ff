"""The generative tasks as a user meets them: bad input exits 2 before anything is written; a smoke run
prints teacher, student and method rows with the quality, NFE and per-image efficiency columns; a cell
reruns to the same numbers."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from bench.cli import app


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("setting,expected", [
    ("coco_fid.nfe=[0,4]", "step count must be >= 1"),
    ("coco_fid.nfe=[2]", "dmd2 samples at exactly its trained `steps`=1"),
    ("coco_fid.teacher_folder={tmp}/nowhere", "is not a diffusers pipeline folder"),
    ("coco_fid.captions={tmp}/captions.jsonl", "looks like JSON lines, not CSV"),
    ("coco_fid.captions={tmp}/bad_id.csv", "line 3: image id 'x' is not a non-negative integer"),
])
def test_bad_generative_input_exits_2_and_writes_nothing(tmp_path, setting, expected):
    (tmp_path / "captions.jsonl").write_text('{"image_id": 1, "text": "a cat"}\n')
    (tmp_path / "bad_id.csv").write_text("image_id,text\n12,a cat\nx,a dog\n")
    out = tmp_path / "runs"
    res = invoke("run", "--methods", "dmd2", "--task", "coco_fid", "--set", setting.format(tmp=tmp_path),
                 "--out", str(out))
    assert res.exit_code == 2, res.output
    assert expected in res.output
    assert not out.exists()


def test_a_geneval_prompt_file_in_the_wrong_format_exits_2(tmp_path):
    bad = tmp_path / "evaluation_metadata.jsonl"
    bad.write_text('{"tag": "counting", "include": [{"class": "circle"}], "prompt": "a photo of circles"}\n')
    out = tmp_path / "runs"
    res = invoke("run", "--methods", "sid", "--task", "geneval", "--set", f"geneval.prompts={bad}", "--out", str(out))
    assert res.exit_code == 2 and "count" in res.output and f"{bad}:1" in res.output
    assert not out.exists()


@pytest.mark.slow
def test_coco_fid_smoke_run_prints_rows_with_nfe_and_per_image_costs(tmp_path, cache_dir):
    out = tmp_path / "runs"
    res = invoke("run", "--methods", "dmd2", "--task", "coco_fid", "--steps", "6", "--out", str(out),
                 "--cache-dir", str(cache_dir), "--set", "coco_fid.eval_images=16", "--quiet")
    assert res.exit_code == 0, res.output
    table = next(line for line in res.output.splitlines() if line.startswith("| method"))
    for column in ("FD_smoke", "nfe", "fd_smoke@1", "fd_smoke@4", "params (M)", "GFLOPs", "latency (ms)",
                   "peak mem (MiB)"):
        assert column in table
    rows = {line.split("|")[1].strip() for line in res.output.splitlines() if line.startswith("| ")}
    assert {"teacher", "student", "dmd2"} <= rows
    rec = json.loads(next((out / "records" / "coco_fid" / "val").glob("dmd2__*.json")).read_text())
    eff = rec["efficiency"]
    assert eff["nfe"] == 1 and eff["sampler"]["kind"] == "consistency"
    assert eff["flops_per_network_call"] == eff["flops_per_sample"]  # one network call per image
    assert eff["latency"]["batch_1"]["median_ms"] > 0 and eff["memory"]["batch_1"]["peak_bytes"] > 0
    assert rec["training"]["updates"] == {"student": 2, "fake": 6}  # TTUR: the generator every 5th step
    teacher = json.loads(next((out / "records" / "coco_fid" / "val").glob("teacher__*.json")).read_text())
    assert teacher["efficiency"]["nfe"] == 2 * teacher["efficiency"]["sampler"]["steps"]  # guided: 2 per step
    assert any("real-vs-real floor" in n for n in teacher["notes"])
    # the same cell again, from scratch: the same numbers
    again = invoke("run", "--methods", "dmd2", "--task", "coco_fid", "--steps", "6", "--out", str(tmp_path / "again"),
                   "--cache-dir", str(cache_dir), "--set", "coco_fid.eval_images=16", "--set", "references=false",
                   "--set", "runtime.measure=false", "--quiet")
    assert again.exit_code == 0, again.output
    rec2 = json.loads(next((tmp_path / "again" / "records" / "coco_fid" / "val").glob("dmd2__*.json")).read_text())
    assert rec2["metrics"] == rec["metrics"]
