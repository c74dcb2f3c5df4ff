"""Measurement a user can trust, end to end: profile checks, reproduction of a record, and the
training-step memory and FLOPs probes. (Agreement of back-to-back latency measurements is a timing target:
it is in tests/benchmarks/test_latency_repeatability.py.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from bench.measure.memory import measure_peak_memory

pytestmark = pytest.mark.slow


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True, timeout=600)


def test_profile_mismatch_refuses_and_allow_mismatch_marks_rows(tmp_path, cache_dir):
    out = tmp_path / "runs"
    base = ["run", "--methods", "kd", "--task", "glue/rte", "--steps", "5", "--out", str(out),
            "--cache-dir", str(cache_dir), "--set", "references=false", "--profile", "h200", "-q"]
    refused = cli(*base)
    assert refused.returncode == 2
    assert "does not match hardware profile 'h200'" in refused.stderr and "--allow-mismatch" in refused.stderr
    assert not out.exists()
    ran = cli(*base, "--allow-mismatch")
    assert ran.returncode == 0, ran.stderr
    (path,) = list((out / "records").rglob("*.json"))
    rec = json.loads(path.read_text())
    assert rec["cell"]["profile"] == "h200"
    assert rec["profile"]["verified"] is False and rec["profile"]["mismatches"]
    assert "kd (unverified)" in ran.stdout
    assert re.search(r"\(unverified\): \d+ records were measured on hardware that does not match", ran.stdout)


def test_reproduce_a_smoke_run_exactly(tmp_path, cache_dir):
    out = tmp_path / "runs"
    first = cli("run", "--methods", "taid", "--task", "glue/mrpc", "--out", str(out), "--cache-dir", str(cache_dir),
                "--set", "references=false", "-q")
    assert first.returncode == 0, first.stderr
    (path,) = list((out / "records").rglob("*.json"))
    again = cli("reproduce", str(path), "--out", str(tmp_path / "again"), "--cache-dir", str(cache_dir), "-q")
    assert again.returncode == 0, again.stdout + again.stderr
    rec = json.loads(path.read_text())
    for metric in rec["metrics"]:
        line = next(l for l in again.stdout.splitlines() if l.startswith(metric + " "))
        assert line.rstrip().endswith("identical"), line
    assert "reproduced exactly" in again.stderr


class Wide(torch.nn.Module):
    """64 MiB of weights (4096 x 4096 fp32); a training step adds gradients and two Adam moments."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4096, 4096, bias=False)

    def forward(self, x):
        return self.lin(x)


def wide_forward(model, batch):
    return model(batch["x"])


def wide_loss(model, batch):
    return model(batch["x"]).pow(2).mean()


def test_training_step_memory_counts_gradients_and_optimizer_state():
    model = Wide()
    batch = {"x": torch.randn(8, 4096)}
    weights = 4096 * 4096 * 4
    inference = measure_peak_memory(model, wide_forward, batch)
    training = measure_peak_memory(model, wide_loss, batch, train=True)
    assert training["mode"] == "train" and inference["mode"] == "inference"
    # weights + gradient + exp_avg + exp_avg_sq = 4 x 64 MiB at least
    assert training["peak_bytes"] >= 3.9 * weights, training
    assert inference["peak_bytes"] < 1.5 * weights, inference


def test_training_flops_are_forward_plus_backward(glue_smoke_student):
    from bench.measure.efficiency import forward_flops, training_flops_per_sample

    task, model = glue_smoke_student
    fwd = forward_flops(model, task).flops
    train = training_flops_per_sample(model, task)
    # Backward costs about twice the forward (gradients of inputs and weights) except for the first
    # layer's input: the total lies between 2x and 3x the forward pass.
    assert 2.0 * fwd < train < 3.05 * fwd
