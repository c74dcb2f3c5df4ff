"""Benchmark (pytest-benchmark): what the on-disk teacher-pairs store saves in a methods x seeds matrix.

SlimFlow regresses on noise -> image pairs of the teacher's reference sampler (8 Euler steps with guidance at
the smoke tier: 16 network evaluations per pair). A matrix of slimflow x 3 seeds on the coco_fid smoke task
(256 pairs), trained through the harness loop exactly as ``bench run`` trains each cell, twice:

* **per cell**: every cell builds its own pairs (the store is deleted before each cell), as a method that
  sampled the teacher itself would;
* **shared**: the store starts empty, the first cell builds it, the other two read it from disk.

Reported: the matrix's teacher network evaluations (deterministic) and its training wall time (medians of
interleaved rounds). Run with ``python -m pytest tests/benchmarks/test_teacher_pairs.py --benchmark-only -s``.
"""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import replace

import pytest
import torch

from bench import registry
from bench.api import TaskEnv
from bench.train import train

SEEDS = (0, 1, 2)
STEPS = 10
PAIRS = 256
ROUNDS = 3


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from bench.tasks.coco_fid import CocoFID

    t = CocoFID(CocoFID.Params(teacher_pairs=PAIRS), TaskEnv("smoke", "val", None, tmp_path_factory.mktemp("pairs")))
    t.teacher()  # trained once, outside the timed matrix
    return t


def matrix(task, shared: bool) -> dict:
    from bench.tasks.coco_fid import CocoFID

    cls = registry.methods.get("slimflow")
    cfg = replace(task.training(), steps=STEPS)
    evaluations, t0 = 0, time.perf_counter()
    for seed in SEEDS:
        if not shared:
            shutil.rmtree(task.env.cache_dir / "coco_fid" / "pairs", ignore_errors=True)
        cell_task = CocoFID(task.params, task.env)  # every cell of `bench run` gets its pairs through a store
        cell_task._teachers = task._teachers
        _, result = train(cls(cls.Params()), cell_task, cell_task.student(seed), cell_task.teacher(), cfg, seed=seed)
        evaluations += result.teacher_forward_passes
    return {"wall_s": time.perf_counter() - t0, "teacher_evaluations": evaluations}


def test_teacher_pairs_store_saves_teacher_evaluations(benchmark, task):
    torch.set_num_threads(1)
    runs = {"per_cell": [], "shared": []}
    for _ in range(ROUNDS):
        runs["per_cell"].append(matrix(task, shared=False))
        shutil.rmtree(task.env.cache_dir / "coco_fid" / "pairs", ignore_errors=True)
        runs["shared"].append(matrix(task, shared=True))
    per_cell, shared = runs["per_cell"][-1], runs["shared"][-1]
    per_pair = task.teacher().sampler.nfe
    # deterministic: one build of PAIRS pairs instead of one per cell
    assert shared["teacher_evaluations"] == PAIRS * per_pair
    assert per_cell["teacher_evaluations"] == len(SEEDS) * PAIRS * per_pair
    wall = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    benchmark.extra_info.update(teacher_evaluations={k: v[-1]["teacher_evaluations"] for k, v in runs.items()},
                                wall_s=wall, speedup=wall["per_cell"] / wall["shared"])
    print(f"\nteacher network evaluations: per cell {per_cell['teacher_evaluations']}, shared "
          f"{shared['teacher_evaluations']}; matrix wall time {wall['per_cell']:.2f} s -> {wall['shared']:.2f} s "
          f"(x{wall['per_cell'] / wall['shared']:.2f})")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
