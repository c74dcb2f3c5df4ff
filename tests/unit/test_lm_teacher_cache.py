"""The teacher-output cache (bench.teacher_cache): the top-k approximation by hand, exactness at k = V,
one teacher pass per (teacher, data, k), reads counted as 0 passes, and the harness hook."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bench import teacher_cache as tc
from bench.api import TaskEnv

pytestmark = pytest.mark.usefixtures("one_thread")


LOGP = torch.tensor([[math.log(0.6), math.log(0.3), math.log(0.1)]])


def test_top1_keeps_the_argmax_and_spreads_the_rest():
    values, idx, log_rest = tc.topk_compress(LOGP, 1)
    assert idx.tolist() == [[0]] and values[0].tolist() == pytest.approx([math.log(0.6)])
    assert log_rest.tolist() == pytest.approx([math.log(0.4)], abs=1e-6)  # 1 - 0.6
    # the remaining 0.4 spread over the V - k = 2 other tokens: [0.6, 0.2, 0.2]
    dense = tc.dense_log_probs(values, idx, log_rest, 3)
    assert dense[0].exp().tolist() == pytest.approx([0.6, 0.2, 0.2], abs=1e-6)


def test_k_equal_v_and_v_minus_1_are_exact():
    for k in (2, 3):
        dense = tc.dense_log_probs(*tc.topk_compress(LOGP, k), 3)
        assert dense[0].exp().tolist() == pytest.approx([0.6, 0.3, 0.1], abs=1e-6)


def test_a_tail_with_no_mass_is_floored_not_minus_infinity():
    logp = torch.log_softmax(torch.tensor([[50.0, 0.0, 0.0, 0.0]]), -1)
    dense = tc.dense_log_probs(*tc.topk_compress(logp, 1), 4)
    assert torch.isfinite(dense).all() and dense[0, 1:].max() >= tc.TAIL_FLOOR
    assert dense.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_key_depends_on_every_ingredient():
    base = {"teacher_key": "t", "data_fingerprint": "d", "k": 8, "max_length": 64, "rows_rule": "r"}
    keys = {tc.cache_key(**base)}
    for field, value in (("teacher_key", "t2"), ("data_fingerprint", "d2"), ("k", 9), ("max_length", 128),
                         ("rows_rule", "r2")):
        keys.add(tc.cache_key(**{**base, field: value}))
    assert len(keys) == 6 and tc.cache_key(**base) == tc.cache_key(**base)


def _task(tmp_path: Path, **params):
    from bench.tasks.lm import LM

    return LM(LM.Params(**params), TaskEnv(tier="smoke", subtask="corpus", data_root=None, cache_dir=tmp_path))


def _store(task, teacher, k, folder):
    return tc.TopKTeacherStore(folder=folder, key=f"test-{k}", teacher=teacher, forward=task.forward,
                               split=task.train_data(), rows=task.scored_rows, k=k, vocab_size=task.vocab,
                               batch_size=32)


def test_store_is_built_once_and_exact_at_k_equal_v(tmp_path):
    task = _task(tmp_path)
    teacher = task.student(3).eval()
    batch = task.train_data().batch([5, 0, 17])
    store = _store(task, teacher, task.vocab, tmp_path / "store")
    out, passes, examples = store.outputs(batch)
    n = len(task.train_data())
    assert passes == math.ceil(n / 32) and examples == n and store.info()["built_by_this_cell"]
    with torch.no_grad():
        live = torch.log_softmax(task.forward(teacher, batch).logits, -1)
    assert out.logits.shape == live.shape
    assert torch.allclose(out.logits, live, atol=1e-5)
    # Another cell (a new store object on the same key) reads it: no teacher pass.
    tc.forget_loaded()
    again = _store(task, teacher, task.vocab, tmp_path / "store")
    out2, passes2, examples2 = again.outputs(batch)
    assert (passes2, examples2) == (0, 0) and not again.info()["built_by_this_cell"]
    assert torch.equal(out2.logits, out.logits)
    assert again.info()["exact"] and again.info()["used"]


def test_store_with_small_k_keeps_top_k_and_normalises(tmp_path):
    task = _task(tmp_path)
    teacher = task.student(3).eval()
    batch = task.train_data().batch([1, 2])
    out, _, _ = _store(task, teacher, 8, tmp_path / "s8").outputs(batch)
    with torch.no_grad():
        live = torch.log_softmax(task.forward(teacher, batch).logits, -1)
    top = live.topk(8, -1)
    # below k = V the stored log-probabilities are float16: equal to the teacher's after that rounding
    assert torch.allclose(out.logits.gather(1, top.indices), top.values.half().float(), atol=1e-6)
    assert torch.allclose(out.logits.exp().sum(-1), torch.ones(live.shape[0]), atol=1e-5)


def test_store_refuses_rows_of_other_data(tmp_path):
    task = _task(tmp_path)
    teacher = task.student(3).eval()
    store = _store(task, teacher, 8, tmp_path / "s")
    batch = task.train_data().batch([0, 1])
    batch["labels"][0, 10:] = -100  # fewer scored rows than the stored example has
    with pytest.raises(RuntimeError, match="rows per example"):
        store.outputs(batch)


def test_harness_reads_the_task_store_and_counts_passes(tmp_path):
    from bench.train import HarnessContext

    task = _task(tmp_path)
    teacher = task.teacher()  # trained and cached by the task (smoke: seconds)
    ctx = HarnessContext(task=task, student=task.student(0), teacher=teacher, total_steps=2, seed=0, device="cpu",
                         train_split=task.train_data(), batch_size=8)
    batch = task.train_data().batch(list(range(8)))
    out = ctx.teacher_outputs(batch)
    assert out.logits.shape[0] == sum(task.scored_rows(batch))
    built = ctx.teacher_forward_passes
    assert built == math.ceil(len(task.train_data()) / task.training().eval_batch_size)
    ctx.teacher_outputs(task.train_data().batch(list(range(8, 16))))
    assert ctx.teacher_forward_passes == built  # read from the store
    info = ctx.teacher_cache_info()
    assert info["used"] and info["built_by_this_cell"] and info["k"] == task.vocab
    # teacher_cache=false: the teacher runs on every batch, each call counted
    live_task = _task(tmp_path, teacher_cache=False)
    ctx2 = HarnessContext(task=live_task, student=live_task.student(0), teacher=live_task.teacher(), total_steps=2,
                          seed=0, device="cpu", train_split=live_task.train_data(), batch_size=8)
    ctx2.teacher_outputs(batch)
    ctx2.teacher_outputs(batch)
    assert ctx2.teacher_forward_passes == 2 and not ctx2.teacher_cache_info()["used"]
    with torch.no_grad():
        assert torch.allclose(torch.log_softmax(ctx2.teacher_outputs(batch).logits, -1), out.logits, atol=1e-5)
