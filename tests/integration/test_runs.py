"""Whole runs through the CLI, as a user starts them: determinism, reuse of finished cells, and resume
after SIGKILL with no duplicate or corrupt record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

STEPS = 300


def bench(*args: str, cache: Path) -> list[str]:
    return [sys.executable, "-m", "bench.cli", "run", "--methods", "taid", "--task", "glue/sst2", "--steps", str(STEPS),
            "--cache-dir", str(cache), "--set", "references=false", "--set", "runtime.measure=false", "-q", *args]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def records(out: Path) -> list[Path]:
    return sorted((out / "records").rglob("*.json"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir) -> dict:
    out = tmp_path_factory.mktemp("ref")
    run(bench("--out", str(out), cache=cache_dir))
    (path,) = records(out)
    return {"out": out, "path": path, "record": json.loads(path.read_text())}


def test_same_seed_twice_gives_identical_metrics(reference, tmp_path, cache_dir):
    run(bench("--out", str(tmp_path), cache=cache_dir))
    (path,) = records(tmp_path)
    again = json.loads(path.read_text())
    assert again["metrics"] == reference["record"]["metrics"]
    assert again["training"]["loss_log"] == reference["record"]["training"]["loss_log"]
    assert again["config_hash"] == reference["record"]["config_hash"]


def test_the_record_keeps_the_command_line_that_made_it(reference, cache_dir):
    import shlex

    cmd = bench("--out", str(reference["out"]), cache=cache_dir)
    assert reference["record"]["invocation"] == shlex.join(["bench", *cmd[cmd.index("run"):]])


def test_rerun_of_a_finished_matrix_does_no_training(reference, cache_dir):
    before = reference["path"].stat().st_mtime_ns
    proc = run(bench("--out", str(reference["out"]), cache=cache_dir))
    assert "1 ok (1 reused" in proc.stderr.replace("\n", " ")
    assert reference["path"].stat().st_mtime_ns == before


def test_force_redoes_the_cell(reference, tmp_path, cache_dir):
    out = tmp_path / "copy"
    run(bench("--out", str(out), cache=cache_dir))
    (path,) = records(out)
    first = json.loads(path.read_text())["created"]
    time.sleep(1.1)
    run(bench("--out", str(out), "--force", cache=cache_dir))
    assert json.loads(path.read_text())["created"] != first


def test_sigkill_mid_cell_then_rerun_completes_exactly(reference, tmp_path, cache_dir):
    out = tmp_path / "killed"
    cmd = bench("--out", str(out), "--set", "runtime.checkpoint_every=20", cache=cache_dir)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt_dirs = out / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline:
        if any(ckpt_dirs.glob("*/state.pt")) or proc.poll() is not None:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before a checkpoint was seen; the test could not interrupt it"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert records(out) == [], "a killed cell must not leave a record"

    run(cmd)
    (path,) = records(out)
    rec = json.loads(path.read_text())
    assert rec["status"] == "ok"
    assert rec["training"]["resumed_from_step"] and rec["training"]["resumed_from_step"] % 20 == 0
    assert rec["metrics"] == reference["record"]["metrics"]
    assert rec["training"]["loss_log"] == reference["record"]["training"]["loss_log"]
    assert not list(ckpt_dirs.glob("*/state.pt")), "checkpoints are removed once the record is written"
    leftovers = [p for p in out.rglob("*") if p.is_file() and (p.name.startswith(".") or ".tmp" in p.name)]
    assert leftovers == []
