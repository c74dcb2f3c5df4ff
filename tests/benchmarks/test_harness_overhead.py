"""Benchmarks (pytest-benchmark): the harness's training loop against a bare PyTorch loop on the same
model and batches, and the cost of the measurement module itself.

Run with ``python -m pytest tests/benchmarks --benchmark-only`` (they are skipped in the normal test run).
Target: harness time / bare time <= 1.03. The two loops are timed in interleaved rounds (ABAB...) so that
drift of a shared machine hits both alike (asv's interleaving, measurement.md §5.4); medians are compared.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from bench.api import TrainConfig
from bench.methods.reference import Student
from bench.train import batch_indices, build_optimizer, lr_lambda, seed_everything, train

STEPS = 150
ROUNDS = 7


@pytest.fixture(scope="module")
def setup(glue_smoke_task):
    task = glue_smoke_task
    base = task.training()
    cfg = TrainConfig(steps=STEPS, batch_size=base.batch_size, eval_batch_size=base.eval_batch_size, optim=base.optim)
    split = task.train_data()
    return task, cfg, split


def bare_loop(task, cfg, split, seed=0):
    """What a researcher's own script does: collate, forward, loss, backward, clip, step, schedule."""
    model = task.student(seed).train()
    seed_everything(seed)  # as the harness does: after the student is built, before the first step
    opt = build_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    n = len(split)
    for step in range(cfg.steps):
        batch = split.batch(batch_indices(n, cfg.batch_size, seed, step))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"]).logits
        loss = F.cross_entropy(logits.float(), batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
    return model


def harness_loop(task, cfg, split, seed=0):
    return train(Student(Student.Params()), task, task.student(seed), None, cfg, seed=seed)[0]


def test_harness_loop_overhead(benchmark, setup):
    task, cfg, split = setup
    torch.set_num_threads(2)
    # Same numbers first: the comparison is only meaningful if both loops do the same work.
    a = bare_loop(task, cfg, split)
    b = harness_loop(task, cfg, split)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    times = {"bare": [], "harness": []}
    for _ in range(ROUNDS):
        for name, fn in (("bare", bare_loop), ("harness", harness_loop)):
            t0 = time.perf_counter()
            fn(task, cfg, split)
            times[name].append(time.perf_counter() - t0)
    ratio = statistics.median(times["harness"]) / statistics.median(times["bare"])
    benchmark.extra_info.update({"ratio_harness_over_bare": ratio, "steps": STEPS,
                                 "bare_median_s": statistics.median(times["bare"]),
                                 "harness_median_s": statistics.median(times["harness"])})
    benchmark.pedantic(harness_loop, args=(task, cfg, split), rounds=3, iterations=1)
    print(f"\nharness/bare = {ratio:.4f} (medians of {ROUNDS} interleaved rounds of {STEPS} steps)")
    assert ratio <= 1.03


def test_measurement_cost(benchmark, setup):
    from bench.measure.efficiency import efficiency
    from bench.profiles import detect_profile

    task, _, _ = setup
    model = task.student(0)
    profile = detect_profile()
    result = benchmark.pedantic(efficiency, args=(model, task, profile), rounds=3, iterations=1)
    assert result["flops_per_sample"] > 0 and result["memory"]["batch_1"]["peak_bytes"] > 0
