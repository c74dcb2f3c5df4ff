"""The lm track end to end: lm-eval in-process with no network access, a methods x seeds matrix that runs
the teacher over the data once, and the smoke leaderboard of ``bench run --methods taid,minima,gkd --task lm``."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bench.api import TaskEnv
from bench.config import Suite, resolve
from bench.runner import RunOptions, execute
from bench.store import read_record

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve a name or open an internet socket fails and is recorded."""
    attempts: list[str] = []
    real_connect = socket.socket.connect

    def refuse(what):
        def fn(*args, **kwargs):
            attempts.append(f"{what}{args[1:] if what == 'connect' else args}")
            raise OSError(f"network access attempted in a test: {what}")
        return fn

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(f"connect {address}")
            raise OSError("network access attempted in a test: connect")
        return real_connect(self, address)  # local (AF_UNIX) sockets stay usable

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "gethostbyname", refuse("gethostbyname"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


def _suite(out: Path, methods: list[str], seeds: list[int], steps: int, **task_params) -> Suite:
    return Suite(tasks=["lm"], methods=methods, seeds=seeds, tier="smoke", out=str(out), references=False,
                 train={"steps": steps}, runtime={"measure": False}, task_params={"lm": task_params})


def _run(suite: Suite, out: Path, cache: Path) -> dict[tuple[str, int], dict]:
    from bench.profiles import detect_profile

    summary = execute(resolve(suite), RunOptions(out=out, cache_dir=cache, data_root=None, profile=detect_profile()))
    return {(o.cell.method, o.cell.seed): read_record(o.path) for o in summary.outcomes}


def test_lm_eval_scores_a_distilled_student_in_process_without_network(no_network, tmp_path, cache_dir, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)  # nothing may rely on them: there is simply nothing to fetch
    recs = _run(_suite(tmp_path, ["taid"], [0], steps=5), tmp_path, cache_dir)
    rec = recs[("taid", 0)]
    assert rec["status"] == "ok", rec.get("traceback")
    m = rec["metrics"]
    for name in ("perplexity", "bits_per_byte", "sst2", "cola", "mrpc_f1", "mrpc_acc", "rte", "qnli", "mnli",
                 "mnli_mm", "prompt_avg"):
        assert isinstance(m[name], float) and math.isfinite(m[name]), name
    assert m["perplexity"] > 1 and 0 <= m["sst2"] <= 1 and rec["score"] == m["prompt_avg"]
    assert no_network == []


def test_lm_eval_evaluates_the_model_object_itself(tmp_path, cache_dir, monkeypatch):
    """No save/load round trip: HFLM receives the in-memory model and the tokenizer object."""
    from bench.tasks.lm import LM
    from lm_eval.models import huggingface

    seen = {}
    real_init = huggingface.HFLM.__init__

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        return real_init(self, *args, **kwargs)

    monkeypatch.setattr(huggingface.HFLM, "__init__", spy)
    task = LM(LM.Params(), TaskEnv("smoke", "corpus", None, cache_dir))
    model = task.student(0)
    task.evaluate(model)
    assert seen["pretrained"] is model and seen["tokenizer"] is task.tokenizer


def test_a_matrix_of_three_methods_and_two_seeds_runs_the_teacher_once(tmp_path, cache_dir):
    recs = _run(_suite(tmp_path, ["kd", "taid", "minima"], [0, 1], steps=6), tmp_path, cache_dir)
    assert len(recs) == 6 and all(r["status"] == "ok" for r in recs.values()), \
        [r.get("traceback") for r in recs.values() if r["status"] != "ok"]
    caches = [r["training"]["teacher_cache"] for r in recs.values()]
    assert all(c["used"] for c in caches) and len({c["key"] for c in caches}) == 1
    built = [r for r in recs.values() if r["training"]["teacher_cache"].get("built_by_this_cell")]
    n_blocks = recs[("kd", 0)]["data"]["blocks"]["n"]
    passes = [r["training"]["teacher_forward_passes"] for r in recs.values()]
    if built:  # this session's cache may already hold the store; then every cell reads it
        assert len(built) == 1
        assert built[0]["training"]["teacher_forward_passes"] == math.ceil(n_blocks / 32)
        assert built[0]["training"]["teacher_examples"] == n_blocks
        assert sorted(passes) == [0] * 5 + [math.ceil(n_blocks / 32)]
    else:
        assert passes == [0] * 6
    assert Path(caches[0]["path"]).is_file()


@pytest.mark.parametrize("method", ["rkl", "skew_kl", "gkd", "ddk", "step_by_step"])
def test_every_lm_method_runs_a_cell(method, tmp_path, cache_dir):
    rec = _run(_suite(tmp_path, [method], [0], steps=4), tmp_path, cache_dir)[(method, 0)]
    assert rec["status"] == "ok", rec.get("traceback")
    assert rec["training"]["steps"] == 4 and math.isfinite(rec["metrics"]["perplexity"])
    assert rec["method_info"] is not None


def test_cli_smoke_prints_the_lm_leaderboard(tmp_path, cache_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "run", "--methods", "taid,minima,gkd", "--task", "lm",
                           "--steps", "10", "--out", str(tmp_path), "--cache-dir", str(cache_dir)],
                          capture_output=True, text=True, timeout=900, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| method"))
    for col in ("perplexity", "sst2", "cola", "mrpc_f1", "rte", "qnli", "mnli", "mnli_mm", "params (M)",
                "MFLOPs/token", "tokens/s", "TTFT (ms)", "peak mem (MiB)"):
        assert col in header, col
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["teacher", "student", "taid", "minima", "gkd"]
    assert all(r.rstrip().endswith("| ok |") for r in rows[1:])
    recs = {p.stem.split("__")[0]: read_record(p) for p in (tmp_path / "records").rglob("*.json")}
    gen = recs["taid"]["efficiency"]["generation"]
    assert gen["tokens_per_s"] > 0 and gen["ttft_ms"] > 0 and recs["taid"]["efficiency"]["flops_per_token"] > 0


def test_full_tier_path_with_local_checkpoints_and_a_local_dataset(tmp_path, cache_dir):
    """The full tier's code path offline: a checkpoint folder (teacher; the student keeps its layers 0 and
    2), a datasets folder of JSONL files, the top-k cache below V."""
    import json

    from bench.tasks.lm import LM

    smoke = LM(LM.Params(), TaskEnv("smoke", "corpus", None, cache_dir))
    ckpt = tmp_path / "teacher-ckpt"
    smoke.teacher().save_pretrained(ckpt)
    smoke.tokenizer.save_pretrained(ckpt)
    data = tmp_path / "corpus"
    data.mkdir()
    docs = [d for dom in smoke.corpus.domains for d in smoke.corpus.train[dom]]
    for split, rows in (("train", docs), ("validation", smoke.corpus.heldout)):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    out = tmp_path / "runs"
    suite = Suite(tasks=["lm"], methods=["kd", "minima"], seeds=[0], tier="full", out=str(out), references=False,
                  train={"steps": 3}, runtime={"measure": False},
                  task_params={"lm": {"teacher_checkpoint": str(ckpt), "student_layers": [0, 2], "dataset": str(data),
                                      "max_length": 64, "teacher_topk": 16, "domain_val_docs": 8}})
    recs = _run(suite, out, cache_dir)
    for name in ("kd", "minima"):
        rec = recs[(name, 0)]
        assert rec["status"] == "ok", rec.get("traceback")
        assert math.isfinite(rec["metrics"]["perplexity"]) and rec["teacher"]["trained_by"] == "checkpoint"
        assert rec["efficiency"]["params"] < sum(p.numel() for p in smoke.teacher().parameters())
        assert rec["training"]["teacher_cache"]["k"] == 16 and not rec["training"]["teacher_cache"]["exact"]
    assert recs[("minima", 0)]["method_info"]["init"].startswith("pruned from the teacher: layers [1, 2] of 4")


def test_lm_eval_does_not_run_git_in_the_users_folder(tmp_path, cache_dir, monkeypatch):
    """lm-eval would run ``git describe`` in the current directory (printing "fatal: not a git repository"
    outside a checkout); bench records its own commit, so no git process is started by the evaluation."""
    import subprocess as sp

    from bench.tasks.lm import LM

    task = LM(LM.Params(eval_limit=4), TaskEnv(tier="smoke", subtask="corpus", data_root=None, cache_dir=cache_dir))
    model = task.student(0)
    calls = []
    real = sp.check_output

    def spy(cmd, *a, **kw):
        calls.append(cmd)
        return real(cmd, *a, **kw)

    monkeypatch.setattr(sp, "check_output", spy)
    monkeypatch.chdir(tmp_path)
    metrics = task.evaluate(model)
    assert metrics and not [c for c in calls if c and c[0] == "git"]
