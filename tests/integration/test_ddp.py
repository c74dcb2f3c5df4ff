"""``bench run --nproc-per-node 2`` on CPU (gloo): a data-parallel cell trains on the single-process run's global
batches, each rank on its half, with averaged gradients, so its losses equal the single-process run's within
float tolerance at every step (not only the first: a missing or wrong gradient average shows from step 2 on);
the record states the world, and unsupported combinations exit 2 before anything runs.

The cell is ``kd`` on the imagenet smoke task: its student (a tiny ViT) has no dropout and no BatchNorm and its
data no augmentation, so one process and two compute the same function of the same examples (the glue smoke
student has dropout, whose masks depend on how the batch is split)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

STEPS = 4
GLOBAL_BATCH = 32  # the imagenet smoke budget's batch (tasks/imagenet: TrainConfig(batch_size=32) at smoke)


def bench(*args: str, out: Path, cache: Path, method: str = "kd", task: str = "imagenet") -> list[str]:
    return [sys.executable, "-m", "bench.cli", "run", "--methods", method, "--task", task, "--steps", str(STEPS),
            "--out", str(out), "--cache-dir", str(cache), "--set", "references=false", "--set",
            "runtime.measure=false", "-q", *args]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def record(out: Path) -> dict:
    (path,) = sorted((out / "records").rglob("*.json"))
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir) -> tuple[dict, dict]:
    single, ddp = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("ddp")
    for out, extra in ((single, ()), (ddp, ("--nproc-per-node", "2"))):
        proc = run(bench(*extra, out=out, cache=cache_dir))
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return record(single), record(ddp)


def test_two_ranks_train_on_the_same_global_batches_with_the_same_losses(runs):
    one, two = runs
    assert one["status"] == two["status"] == "ok"
    assert "distributed" not in one["training"] and "distributed" not in one["config"]
    d = two["training"]["distributed"]
    assert d["world_size"] == 2 and d["backend"] == "gloo"
    assert d["global_batch"] == GLOBAL_BATCH and d["per_rank_batch"] == GLOBAL_BATCH // 2
    # measured in the loop: each rank trained on half of every global batch, together the single run's samples
    assert d["examples_per_rank"] == [STEPS * GLOBAL_BATCH // 2] * 2
    assert sum(d["examples_per_rank"]) == one["training"]["samples"] == two["training"]["samples"]
    assert "device count" in d["determinism"]
    assert two["config"]["distributed"] == {"world_size": 2}
    # every step is logged (STEPS < 20); the loss of step 1 is the initial model's on the first global batch,
    # later ones follow the averaged gradient's updates
    log1, log2 = one["training"]["loss_log"], two["training"]["loss_log"]
    assert [e["step"] for e in log1] == [e["step"] for e in log2] == list(range(1, STEPS + 1))
    assert log2[0]["student"] == pytest.approx(log1[0]["student"], rel=1e-6)
    for a, b in zip(log1, log2):
        assert b["student"] == pytest.approx(a["student"], rel=1e-5, abs=1e-6), (log1, log2)
    assert two["training"]["teacher_examples"] == one["training"]["teacher_examples"]


@pytest.mark.parametrize("args, message", [
    (("--methods", "meal_v2"), "trains modules besides the student"),
    (("--methods", "sd_gt"), "trains in generations"),
    (("--task", "lm"), "not supported yet"),
    (("--executor", "ray"), "--executor ray is not supported yet"),
    (("--nproc-per-node", "0"), "expected a positive number"),
])
def test_unsupported_combinations_exit_2_and_write_nothing(tmp_path, cache_dir, args, message):
    cmd = bench("--nproc-per-node", "2", out=tmp_path / "out", cache=cache_dir)
    for flag, value in zip(args[::2], args[1::2]):  # replace the option's value (or add the option)
        if flag in cmd:
            cmd[cmd.index(flag) + 1] = value
        else:
            cmd += [flag, value]
    proc = run(cmd)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in " ".join(proc.stderr.split()), proc.stderr
    assert not (tmp_path / "out" / "records").exists()


def test_a_global_batch_not_divisible_by_the_ranks_is_a_clear_failure(tmp_path, cache_dir):
    proc = run(bench("--nproc-per-node", "3", out=tmp_path, cache=cache_dir))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rec = record(tmp_path)
    assert rec["status"] == "failed"
    assert "global batch of 32 examples is not divisible by --nproc-per-node 3" in rec["reason"]
