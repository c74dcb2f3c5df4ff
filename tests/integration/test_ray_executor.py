"""``bench run --executor ray``: the same records as the local executor, a worker killed mid-cell retried by
Ray and resumed from its checkpoint, finished cells skipped before anything is submitted, and the CLI's
errors (exit 2) for an unknown executor or a missing Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app

REPO = Path(__file__).resolve().parents[2]
STEPS = 60
CKPT_EVERY = 10
METHODS = ("kd", "taid")
KILLED = "taid"  # the method whose worker is killed mid-cell


def bench(*args: str, out: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "bench.cli", "run", "--methods", ",".join(METHODS), "--task", "glue/sst2",
            "--steps", str(STEPS), "--out", str(out), "--cache-dir", str(cache), "--set", "references=false",
            "--set", "runtime.measure=false", *args]


def env() -> dict[str, str]:
    # One thread per process (the auto profile then asks Ray for one CPU per cell: two cells run at once on
    # two cores); Ray's token-authentication notice is noise here.
    return {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}


def records(out: Path) -> dict[str, dict]:
    found = {}
    for path in sorted((out / "records").rglob("*.json")):
        rec = json.loads(path.read_text())  # every record file is complete JSON
        assert rec["cell"]["method"] not in found, f"two records for {rec['cell_id']}"
        found[rec["cell"]["method"]] = rec
    return found


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, cache_dir) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("local")
    proc = subprocess.run(bench("-q", out=out, cache=cache_dir), capture_output=True, text=True, env=env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return records(out)


def _descendants(pid: int):
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, cache_dir, local_run) -> dict:
    """The matrix through a local Ray cluster (started by bench), with the worker of one cell SIGKILLed right
    after that cell wrote its first checkpoint."""
    pytest.importorskip("ray")
    out = tmp_path_factory.mktemp("ray")
    cmd = bench("--executor", "ray", "--set", f"runtime.checkpoint_every={CKPT_EVERY}", out=out, cache=cache_dir)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
                            start_new_session=True)
    killed = None
    try:
        deadline = time.time() + 400
        while killed is None and time.time() < deadline and proc.poll() is None:
            if any(out.glob(f"checkpoints/glue.sst2--{KILLED}--*/state.pt")):
                assert not list(out.glob(f"records/glue/sst2/{KILLED}__*.json")), "the cell finished before the kill"
                # Ray titles a worker process "ray::<task name>" while it runs the task; bench names the task
                # after its cell.
                workers = [p for p in _descendants(proc.pid)
                           if (p.cmdline() or [""])[0].startswith(f"ray::bench:glue.sst2--{KILLED}--")]
                if workers:
                    (worker,) = workers
                    killed = worker.pid
                    os.kill(killed, signal.SIGKILL)
                    break
            time.sleep(0.02)
        assert killed is not None, "no checkpoint of the cell appeared while its worker ran; nothing was killed"
        output, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:  # a hung run: stop the driver and the cluster it started (its children)
            for p in _descendants(proc.pid):
                p.kill()
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 0, output
    return {"out": out, "output": output, "killed": killed, "records": records(out)}


@pytest.mark.slow
def test_ray_records_equal_the_local_executors(ray_run, local_run):
    assert sorted(ray_run["records"]) == sorted(local_run) == sorted(METHODS)
    for method, local in local_run.items():
        rec = ray_run["records"][method]
        assert rec["status"] == "ok", rec.get("reason")
        assert rec["cell_id"] == local["cell_id"]
        assert rec["config_hash"] == local["config_hash"]
        assert rec["metrics"] == local["metrics"]
        assert rec["training"]["loss_log"] == local["training"]["loss_log"]
        assert rec["efficiency"]["params"] == local["efficiency"]["params"]
        assert rec["efficiency"]["flops_per_sample"] == local["efficiency"]["flops_per_sample"]
        assert "--executor ray" in rec["invocation"] and "--executor" not in local["invocation"]  # the driver's
    # the driver printed the same leaderboard table (one row per method)
    for method in METHODS:
        assert f"| {method} |" in ray_run["output"]
    assert "2 cells: 2 ok (0 reused" in ray_run["output"].replace("\n", " ")


@pytest.mark.slow
def test_a_worker_killed_mid_cell_is_retried_and_resumes_from_its_checkpoint(ray_run):
    out = ray_run["out"]
    files = sorted((out / "records").rglob("*.json"))
    assert len(files) == len(METHODS), files  # exactly one record per cell
    killed = ray_run["records"][KILLED]
    assert killed["status"] == "ok"
    resumed = killed["training"]["resumed_from_step"]
    assert resumed and resumed % CKPT_EVERY == 0 and resumed < STEPS, resumed
    untouched = [m for m in METHODS if m != KILLED]
    assert all(ray_run["records"][m]["training"]["resumed_from_step"] is None for m in untouched)
    assert not list(out.glob("checkpoints/*/*")), "checkpoints are removed once the record is written"
    leftovers = [p for p in out.rglob("*") if p.is_file() and (p.name.startswith(".") or ".tmp" in p.name)]
    assert leftovers == []


@pytest.mark.slow
def test_rerun_through_ray_reuses_finished_cells_without_starting_ray(ray_run, cache_dir):
    out = ray_run["out"]
    before = {p: p.stat().st_mtime_ns for p in (out / "records").rglob("*.json")}
    proc = subprocess.run(bench("--executor", "ray", out=out, cache=cache_dir), capture_output=True, text=True,
                          env=env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 ok (2 reused" in proc.stderr.replace("\n", " ")
    assert "submitted" not in proc.stderr  # nothing was submitted, Ray not started
    assert {p: p.stat().st_mtime_ns for p in before} == before


@pytest.mark.slow
def test_subtasks_sharing_one_training_run_in_one_ray_task(tmp_path, cache_dir):
    """sam's box and point prompts share one trained model (`Task.shared_training`): one Ray task trains it
    in the box cell and the point cell evaluates that model, as the local executor does."""
    pytest.importorskip("ray")
    cmd = [sys.executable, "-m", "bench.cli", "run", "--methods", "student", "--task", "sam", "--steps", "3",
           "--out", str(tmp_path), "--cache-dir", str(cache_dir), "--set", "references=false",
           "--set", "runtime.measure=false", "--set", "sam.eval_images=2", "--executor", "ray"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "submitted 2 cells as 1 Ray task (" in proc.stderr
    recs = {r["cell"]["subtask"]: r for r in map(json.loads, map(Path.read_text, (tmp_path / "records").rglob("*.json")))}
    box, point = recs["box"]["training"]["shared"], recs["point"]["training"]["shared"]
    assert box["reused"] is False and box["trained_in"] == recs["box"]["cell_id"]
    assert point == {**box, "reused": True}
    assert recs["point"]["training"]["loss_log"] == recs["box"]["training"]["loss_log"]


def test_a_lost_cell_gets_a_failed_record(tmp_path):
    """Retries exhausted (the worker died every time): the driver writes the cell's failed record."""
    ray = pytest.importorskip("ray")
    from bench.executors import MAX_RETRIES, _lost
    from bench.runner import RunOptions
    from bench.store import Cell, Store, read_record

    store = Store(tmp_path)
    cell = Cell("glue", "sst2", "kd", "smoke", "p", 0)
    opts = RunOptions(out=tmp_path, cache_dir=tmp_path, data_root=None, profile={"id": "p"})
    outcome = _lost(cell, {"a": 1}, ray.exceptions.WorkerCrashedError(), store, opts, {}, "2000-01-01T00:00:00+00:00")
    assert outcome.status == "failed"
    rec = read_record(store.record_path(cell))
    assert rec["status"] == "failed" and f"{MAX_RETRIES} times" in rec["reason"] and "WorkerCrashedError" in rec["reason"]


def _options(profile: dict):
    from bench.runner import RunOptions

    return RunOptions(out=Path("o"), cache_dir=Path("c"), data_root=None, profile=profile)


def test_a_worker_on_other_hardware_than_the_profile_refuses_its_cells():
    from bench.executors import _worker_options
    from bench.measure.hardware import fingerprint
    from bench.profiles import detect_profile

    here = detect_profile()
    opts, refusal = _worker_options(_options(here), allow_mismatch=False)
    assert refusal is None and opts.profile["verified"] is True and opts.profile["mismatches"] == []
    # the derived profile of another machine (another CPU model): refused, with the fix named
    other = {**here, "hardware": {**fingerprint(), "cpu_model": "Some Other CPU 9000"}}
    opts, refusal = _worker_options(_options(other), allow_mismatch=False)
    assert refusal and "does not match hardware profile" in refusal and "--profile" in refusal
    assert opts.profile["hardware"]["cpu_model"] != "Some Other CPU 9000"  # the record names this worker's CPU
    # a declared GPU profile on this CPU-only worker: refused, or run on the CPU and marked unverified
    gpu = {"kind": "declared", "id": "gpu-box", "device": "cuda", "name_pattern": ".*", "device_count": 1,
           "threads": 1, "peak_flops": {"float32": 1e12}, "memory_bytes": 2**30, "hardware": {}}
    if fingerprint().get("device_kind") == "cpu":
        opts, refusal = _worker_options(_options(gpu), allow_mismatch=False)
        assert refusal and "gpu-box" in refusal and "device: profile declares cuda" in refusal
        opts, refusal = _worker_options(_options(gpu), allow_mismatch=True)
        assert refusal is None and opts.profile["verified"] is False and opts.device == "cpu"


# --------------------------------------------------------------------------------------------------
# The CLI's checks: exit 2, nothing written, Ray never imported at start-up
# --------------------------------------------------------------------------------------------------


def test_unknown_executor_exits_2_naming_the_valid_ones(tmp_path):
    res = CliRunner().invoke(app, ["run", "--methods", "kd", "--task", "glue/sst2", "--out", str(tmp_path / "o"),
                                   "--executor", "dask"])
    assert res.exit_code == 2
    assert "unknown executor" in res.output and "local, ray" in res.output
    assert not (tmp_path / "o").exists()


def test_executor_ray_without_ray_installed_exits_2_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    res = CliRunner().invoke(app, ["run", "--methods", "kd", "--task", "glue/sst2", "--out", str(tmp_path / "o"),
                                   "--executor", "ray"])
    assert res.exit_code == 2
    assert "pip install 'bench[ray]'" in res.output
    assert not (tmp_path / "o").exists()


def test_ray_address_needs_the_ray_executor(tmp_path):
    res = CliRunner().invoke(app, ["run", "--methods", "kd", "--task", "glue/sst2", "--out", str(tmp_path / "o"),
                                   "--ray-address", "auto"])
    assert res.exit_code == 2 and "--executor ray" in res.output


CHECK_NO_RAY = """
import sys
from typer.testing import CliRunner
from bench.cli import app
import bench.executors  # what `bench run` imports first, whichever the executor
for args in (["--help"], ["run", "--help"]):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, (args, res.output)
    assert args == ["--help"] or ("--executor" in res.output and "bench[ray]" in res.output), res.output
print("RAY", sorted(m for m in sys.modules if m.split(".")[0] == "ray"))
"""


def test_help_does_not_import_ray():
    proc = subprocess.run([sys.executable, "-c", CHECK_NO_RAY], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert "RAY []" in proc.stdout, proc.stdout
