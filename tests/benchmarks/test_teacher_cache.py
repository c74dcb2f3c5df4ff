"""Benchmark (pytest-benchmark): what the teacher-output cache saves in a methods x seeds matrix.

A matrix of 3 methods (kd, taid, minima) x 2 seeds on the smoke lm task, trained through the harness loop
(``bench.train.train``) exactly as ``bench run`` trains each cell, twice:

* **live**: ``lm.teacher_cache=false`` — every training batch of every cell runs the teacher;
* **cached**: the top-k store (k = V at the smoke tier: exact) starts empty, the first cell builds it with
  one teacher pass over the training split, the other five read it.

Reported: teacher forward passes of the whole matrix (deterministic) and the matrix's training wall time;
the speed-up is live / cached (medians of interleaved rounds, asv's interleaving, measurement.md §5.4).
Run with ``python -m pytest tests/benchmarks/test_teacher_cache.py --benchmark-only -s``.
"""

from __future__ import annotations

import math
import shutil
import statistics
import time

import pytest
import torch

from bench import registry
from bench.api import TaskEnv, TrainConfig
from bench.train import train

METHODS = ("kd", "taid", "minima")
SEEDS = (0, 1)
STEPS = 100
ROUNDS = 3


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    from bench.tasks.lm import LM

    cache = tmp_path_factory.mktemp("lm-cache-bench")
    cached = LM(LM.Params(), TaskEnv("smoke", "corpus", None, cache))
    live = LM(LM.Params(teacher_cache=False), TaskEnv("smoke", "corpus", None, cache))
    for t in (cached, live):
        t.teacher()  # trained once (same key for both), outside the timed matrix
    return cached, live


def matrix(task) -> dict:
    """Train every (method, seed) cell of the matrix; teacher passes and wall time."""
    base = task.training()
    cfg = TrainConfig(steps=STEPS, batch_size=base.batch_size, eval_batch_size=base.eval_batch_size, optim=base.optim)
    passes, cells = 0, []
    t0 = time.perf_counter()
    for name in METHODS:
        cls = registry.methods.get(name)
        for seed in SEEDS:
            method = cls(cls.Params())
            teacher = task.teacher(method.select_teacher(task.teacher_pool(), task.student_params()))
            _, result = train(method, task, task.student(seed), teacher, cfg, seed=seed)
            passes += result.teacher_forward_passes
            cells.append((name, seed, result.teacher_forward_passes, result.teacher_cache.get("used")))
    return {"wall_s": time.perf_counter() - t0, "teacher_passes": passes, "cells": cells}


def fresh_store(task) -> None:
    from bench import teacher_cache

    shutil.rmtree(task.env.cache_dir / "lm" / "teacher_outputs", ignore_errors=True)
    teacher_cache.forget_loaded()


def test_teacher_cache_speedup(benchmark, tasks):
    cached_task, live_task = tasks
    torch.set_num_threads(1)
    runs = {"live": [], "cached": []}
    for _ in range(ROUNDS):
        runs["live"].append(matrix(live_task))
        fresh_store(cached_task)
        runs["cached"].append(matrix(cached_task))
    live, cached = runs["live"][-1], runs["cached"][-1]
    n = len(cached_task.train_data())
    build = math.ceil(n / cached_task.training().eval_batch_size)
    # Deterministic counts: live runs the teacher on every step of every cell; cached once over the data.
    assert live["teacher_passes"] == len(METHODS) * len(SEEDS) * STEPS
    assert cached["teacher_passes"] == build
    assert sorted(c[2] for c in cached["cells"]) == [0] * 5 + [build]
    speedup = statistics.median(r["wall_s"] for r in runs["live"]) / statistics.median(r["wall_s"] for r in runs["cached"])
    info = {"speedup_live_over_cached": speedup, "cells": len(METHODS) * len(SEEDS), "steps_per_cell": STEPS,
            "teacher_passes_live": live["teacher_passes"], "teacher_passes_cached": cached["teacher_passes"],
            "live_median_s": statistics.median(r["wall_s"] for r in runs["live"]),
            "cached_median_s": statistics.median(r["wall_s"] for r in runs["cached"]),
            "teacher_params": sum(p.numel() for p in cached_task.teacher().parameters()),
            "student_params": cached_task.student_params(), "train_blocks": n}
    benchmark.extra_info.update(info)
    benchmark.pedantic(lambda: matrix(cached_task), rounds=1, iterations=1)
    print(f"\nteacher-output cache, {info['cells']} cells x {STEPS} steps: teacher passes {live['teacher_passes']} "
          f"-> {cached['teacher_passes']}; matrix training {info['live_median_s']:.1f} s -> "
          f"{info['cached_median_s']:.1f} s (speed-up x{speedup:.2f}, medians of {ROUNDS} interleaved rounds)")
    assert speedup > 1.0
