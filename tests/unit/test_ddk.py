"""DDK (Liu et al. 2024): the domain discrepancy factor and factor smoothing on fixed numbers, the
degeneracy check of the domain weights (a far-off student and a near one, by hand), the allocation of an
interval's samples, and the method's resampling on the smoke lm task."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from bench.methods.ddk import DDK, allocate, ddk_loss, discrepancy, smooth_update

from bench.api import TaskEnv

pytestmark = pytest.mark.usefixtures("one_thread")


def test_discrepancy_is_a_softmax_of_perplexity_ratios():
    # ratios l_S / l_T = [2/2, 4/2, 6/2] = [1, 2, 3]; softmax = [e, e^2, e^3] / (e + e^2 + e^3)
    #   = [2.7182818, 7.3890561, 20.0855369] / 30.1928748 = [0.0900306, 0.2447285, 0.6652410]
    r = discrepancy([2.0, 4.0, 6.0], [2.0, 2.0, 2.0])
    assert r == pytest.approx([0.0900306, 0.2447285, 0.6652410], abs=1e-7)


def test_factor_smoothing_by_hand():
    r0 = [0.0900306, 0.2447285, 0.6652410]
    # new ratios [3/2, 2/2, 4/2] = [1.5, 1, 2]: psi = r0 * exp(ratio)
    #   = [0.0900306 * 4.4816891, 0.2447285 * 2.7182818, 0.6652410 * 7.3890561]
    #   = [0.4034890, 0.6652410, 4.9155027], sum 5.9842327 -> [0.0674254, 0.1111656, 0.8214090]
    # r1 = 0.5 * that + 0.5 / 3 = [0.2003794, 0.2222495, 0.5773712]
    r1 = smooth_update(r0, [3.0, 2.0, 4.0], [2.0, 2.0, 2.0], alpha=0.5)
    assert r1 == pytest.approx([0.2003794, 0.2222495, 0.5773712], abs=1e-6)
    assert sum(r1) == pytest.approx(1.0)
    # alpha = 1: no uniform floor, pure multiplicative update; alpha = 0: uniform.
    assert smooth_update(r0, [3.0, 2.0, 4.0], [2.0, 2.0, 2.0], 1.0) == pytest.approx([0.0674254, 0.1111656, 0.8214090], abs=1e-6)
    assert smooth_update(r0, [3.0, 2.0, 4.0], [2.0, 2.0, 2.0], 0.0) == pytest.approx([1 / 3] * 3)


def _method_with(history, names=("a", "b", "c"), teacher_ppl=(5.0, 5.0, 5.0)):
    m = DDK(DDK.Params())
    m.load_state_dict({"r": history[-1]["r"], "teacher_ppl": list(teacher_ppl), "history": history})
    m.names = list(names)
    return m


def test_far_off_student_makes_the_weights_one_hot_and_is_flagged():
    # Teacher perplexity 5 everywhere, student [50, 25, 25]: ratios l_S/l_T = [10, 5, 5] (a student far
    # from its teacher). r_0 = [e^10, e^5, e^5] / (e^10 + 2 e^5) = [1, e^-5, e^-5] / (1 + 2 e^-5);
    # e^-5 = 0.0067379, 1 + 2 e^-5 = 1.0134759: r_0 = [0.9867033, 0.0066484, 0.0066484] (no uniform mixing).
    r0 = discrepancy([50.0, 25.0, 25.0], [5.0, 5.0, 5.0])
    assert r0 == pytest.approx([0.9867033, 0.0066484, 0.0066484], abs=1e-7)
    # The same ratios at the next update: psi = r_0 * [e^10, e^5, e^5] is proportional to [e^10, 1, 1], so
    # psi / sum psi = [e^10, 1, 1] / (e^10 + 2) = [0.9999092, 0.0000454, 0.0000454] and
    # r_1 = 0.5 * that + 1/6 = [0.6666213, 0.1666894, 0.1666894]: max r_1 = 0.667 is under 0.9 -- the
    # uniform term caps r at 0.5 + 1/6 -- but the data-driven part is one-hot.
    r1 = smooth_update(r0, [50.0, 25.0, 25.0], [5.0, 5.0, 5.0], 0.5)
    assert r1 == pytest.approx([0.6666213, 0.1666894, 0.1666894], abs=1e-7)
    m = _method_with([{"step": 0, "student_ppl": [50.0, 25.0, 25.0], "teacher_ppl": [5.0, 5.0, 5.0], "r": r0},
                      {"step": 4, "student_ppl": [50.0, 25.0, 25.0], "r": r1}])
    info = m.record_info()
    assert info["r_history"] == [r0, r1]
    assert info["max_r"] == pytest.approx([0.9867033, 0.6666213], abs=1e-7)
    assert info["max_weight"] == pytest.approx(0.9867033, abs=1e-7)
    assert info["adaptive_max"] == pytest.approx([0.9867033, 0.9999092], abs=1e-7)
    # H(r_0) = -(0.9867033 ln 0.9867033 + 2 * 0.0066484 ln 0.0066484) = 0.0132078 + 0.0666617 = 0.0798695;
    # H(r_1) = 0.6666213 * 0.4055330 + 2 * 0.1666894 * 1.7916234 = 0.2703362 + 0.5972900 = 0.8676262.
    assert info["entropy"] == pytest.approx([0.0798694, 0.8676262], abs=1e-6)
    assert info["normalized_entropy"] == pytest.approx([0.0798694 / math.log(3), 0.8676262 / math.log(3)], abs=1e-6)
    assert info["degenerate"] is True and info["degenerate_updates"] == [0, 1]
    assert info["degenerate_threshold"] == 0.9
    reason = info["degenerate_reason"]
    assert "ratios l_S/l_T were 5-10 at update 0" in reason and "2 of 2 updates (steps 0 to 4)" in reason
    assert "first at update 0: max r = 0.987 on a" in reason
    (note,) = m.table_notes(None)
    assert "near one-hot at 2 of 2 updates (steps 0 to 4; max r = 0.99 at update 0)" in note


def test_near_student_keeps_smooth_weights_and_is_not_flagged():
    # Student [10, 7.5, 5] against 5: ratios [2, 1.5, 1] (the paper's range). r_0 = [e^2, e^1.5, e] / sum
    #   = [7.3890561, 4.4816891, 2.7182818] / 14.5890270 = [0.5064804, 0.3071959, 0.1863237].
    r0 = discrepancy([10.0, 7.5, 5.0], [5.0, 5.0, 5.0])
    assert r0 == pytest.approx([0.5064804, 0.3071959, 0.1863237], abs=1e-7)
    # Next ratios [1.5, 1.2, 1]: psi = r_0 * [e^1.5, e^1.2, e] = [2.2698876, 1.0199263, 0.5064804], sum
    # 3.7962943 -> [0.5979219, 0.2686636, 0.1334144]; r_1 = 0.5 * that + 1/6 = [0.4656276, 0.3009985, 0.2333739].
    r1 = smooth_update(r0, [7.5, 6.0, 5.0], [5.0, 5.0, 5.0], 0.5)
    assert r1 == pytest.approx([0.4656276, 0.3009985, 0.2333739], abs=1e-7)
    m = _method_with([{"step": 0, "student_ppl": [10.0, 7.5, 5.0], "teacher_ppl": [5.0, 5.0, 5.0], "r": r0},
                      {"step": 4, "student_ppl": [7.5, 6.0, 5.0], "r": r1}])
    info = m.record_info()
    assert info["adaptive_max"] == pytest.approx([0.5064804, 0.5979219], abs=1e-7)
    # H(r_0) = -(0.5064804 ln 0.5064804 + 0.3071959 ln 0.3071959 + 0.1863237 ln 0.1863237) = 1.0201913
    assert info["entropy"][0] == pytest.approx(1.0201913, abs=1e-6)
    assert info["degenerate"] is False and info["degenerate_reason"] is None and info["degenerate_updates"] == []
    assert m.table_notes(None) == []


def test_allocation_by_largest_remainder():
    # 7 slots at [0.2, 0.3, 0.5]: [1.4, 2.1, 3.5] -> floors [1, 2, 3], one left for the largest remainder (0.5)
    assert allocate([0.2, 0.3, 0.5], 7) == [1, 2, 4]
    assert sum(allocate([0.0900306, 0.2447285, 0.6652410], 80)) == 80


def test_loss_is_ce_plus_gamma_kl():
    zt = torch.tensor([[0.6, 0.3, 0.1]]).log()
    zs = torch.tensor([[0.2, 0.4, 0.4]]).log()
    # CE 1.5 + 0.2 * KL(p||q) = 1.5 + 0.2 * 0.4342333 = 1.5868467
    assert ddk_loss(zs, zt, torch.tensor(1.5), 0.2, 1.0).item() == pytest.approx(1.5868467, abs=1e-6)


def _task(tmp_path: Path):
    from bench.tasks.lm import LM

    return LM(LM.Params(), TaskEnv(tier="smoke", subtask="corpus", data_root=None, cache_dir=tmp_path))


def _ctx(task, steps):
    from bench.train import HarnessContext

    return HarnessContext(task=task, student=task.student(0), teacher=task.student(1).eval(), total_steps=steps,
                          seed=0, device="cpu", train_split=task.train_data(), batch_size=task.training().batch_size)


def test_method_samples_each_interval_by_r_and_resumes_exactly(tmp_path):
    task = _task(tmp_path)
    dom = task.data_domains()
    ctx = _ctx(task, steps=60)
    m = DDK(DDK.Params())
    m.setup(ctx)
    assert m.K == 2  # round(60 / 30): the paper's 1000 of ~30k steps
    assert sum(m.r) == pytest.approx(1.0) and len(m.r) == len(dom.names)
    teacher_passes = ctx.teacher_forward_passes
    assert teacher_passes == sum(-(-len(v) // task.training().eval_batch_size) for v in dom.validation.values())
    bs = task.training().batch_size
    batch = task.train_data().batch(list(range(bs)))
    m.training_step(batch, ctx)
    counts = Counter(dom.train_domain[i] for i in m.plan)
    assert [counts.get(k, 0) for k in range(len(dom.names))] == allocate(m.r, m.K * bs)
    # A second interval updates r by factor smoothing (one more history entry), with a new plan.
    ctx.step = m.K
    state_before = m.state_dict()
    loss = m.training_step(batch, ctx)["student"]
    assert torch.isfinite(loss) and len(m.history) == 2
    info = m.record_info()
    assert info["r_history"] == [h["r"] for h in m.history] and len(info["entropy"]) == 2
    assert isinstance(info["degenerate"], bool) and (info["degenerate_reason"] is None) == (not info["degenerate"])
    # Resume: a fresh method loaded from the state before the update draws the same plan.
    again = DDK(DDK.Params())
    again.load_state_dict({k: (list(v) if isinstance(v, list) else v) for k, v in state_before.items()})
    again.setup(ctx)
    again.training_step(batch, ctx)
    assert again.plan == m.plan and again.r == pytest.approx(m.r)


def test_unsupported_without_domains(tmp_path):
    from bench.tasks.glue import Glue

    glue = Glue(Glue.Params(), TaskEnv(tier="smoke", subtask="rte", data_root=None, cache_dir=tmp_path))
    assert "domain" in DDK(DDK.Params()).unsupported(glue)
