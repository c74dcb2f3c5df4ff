"""SD-GT (Borup & Andersen 2021): the mixed MSE-on-probabilities target, the norm penalty and the
generations, against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from bench.methods.sd_gt import SDGT, norm_penalty, sd_gt_loss

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _generation_harness import TwoExampleTask as _Task, recorded, run as _run  # noqa: E402

LN3 = math.log(3.0)


def test_mixed_target_by_hand():
    # softmax([0, 0]) = [.5, .5]; one-hot(0) = [1, 0]: label MSE = mean(.25, .25) = .25.
    # Previous generation softmax([ln 3, 0]) = [.75, .25]: distillation MSE = mean(.0625, .0625) = .0625.
    # alpha = .6 weighs the ground truth: .6 * .25 + .4 * .0625 = .175.
    z, y, prev = torch.zeros(1, 2), torch.tensor([0]), torch.tensor([[LN3, 0.0]])
    assert sd_gt_loss(z, y, prev, 0.6).item() == pytest.approx(0.175)
    assert sd_gt_loss(z, y, prev, 1.0).item() == pytest.approx(0.25)  # alpha = 1: ground truth only
    assert sd_gt_loss(z, y, prev, 0.0).item() == pytest.approx(0.0625)  # alpha = 0: pure self-distillation
    assert sd_gt_loss(z, y, None, 0.6).item() == pytest.approx(0.25), "generation 0 fits the ground truth alone"


def test_norm_penalty_sums_norms_not_squares():
    m = torch.nn.Linear(2, 1, bias=True)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[3.0, 4.0]]))
        m.bias.fill_(12.0)
    assert norm_penalty(m, 1e-4).item() == pytest.approx(1e-4 * (5.0 + 12.0))


def test_generations_split_the_budget_and_start_fresh():
    method = SDGT(SDGT.Params())
    plan = method.generations(11)
    assert [g.steps for g in plan] == [3, 2, 2, 2, 2] and all(g.fresh_student for g in plan)
    assert [g.steps for g in method.generations(4)] == [1, 1, 1, 1], "never more generations than steps"
    assert SDGT.uses_task_teacher is False and SDGT.optim_overrides == {"weight_decay": 0.0}


def test_defaults_follow_the_official_code():
    p = SDGT.Params()
    assert (p.alpha, p.steps, p.reg_coef) == (0.6, 5, 1e-4)


# --------------------------------------------------------------------------------------------------
# The generations, driven through the harness loop (bench.train.train) on a two-example task
# --------------------------------------------------------------------------------------------------


_Recorded = recorded(SDGT)


def test_generation_one_fits_labels_generation_two_a_fresh_net_on_generation_one_by_hand():
    # lr 0: every network keeps its hand-made initialisation, so every step's loss is worked out here.
    # Generation 1 (index 0): logits ex0 = [0, 0] + .5, ex1 = [ln 3, 0] + .5 (an equal shift: same softmax),
    # softmax [.5, .5] and [.75, .25]; labels [0, 1]. Label MSE = (.25 + .25 + .5625 + .5625) / 4 = .40625,
    # alone (no alpha), plus .01 (||W|| + ||b||) = .01 (ln 3 + sqrt(.5)).
    # Generation 2 (index 1), a fresh network: logits ex0 = [ln 3, 0] + 1, ex1 = [0, 0] + 1: softmax [.75, .25] and
    # [.5, .5]. Label MSE = (.0625 + .0625 + .25 + .25) / 4 = .15625; MSE to generation 1's softmax
    # ([.5, .5], [.75, .25]) = .0625; .6 * .15625 + .4 * .0625 = .11875, plus .01 (ln 3 + sqrt 2).
    inits = [([[0.0, LN3], [0.0, 0.0]], [0.5, 0.5]), ([[LN3, 0.0], [0.0, 0.0]], [1.0, 1.0])]
    task = _Task([0, 1], inits)
    method = _Recorded(SDGT.Params(steps=2, alpha=0.6, reg_coef=0.01))
    _run(method, task, steps=4, lr=0.0)
    assert [s["gen"] for s in method.steps] == [0, 0, 1, 1]
    gen0 = 0.40625 + 0.01 * (LN3 + math.sqrt(0.5))
    gen1 = 0.6 * 0.15625 + 0.4 * 0.0625 + 0.01 * (LN3 + math.sqrt(2.0))
    assert [s["loss"] for s in method.steps] == pytest.approx([gen0, gen0, gen1, gen1], rel=1e-6)
    assert method.steps[0]["previous"] is None and len(task.seeds) == 2, "one fresh network per generation"


def test_each_generation_is_fresh_and_distils_the_trained_previous_one():
    # Trained for real (lr .5): each step's loss is recomputed here from the weights the step saw, in plain torch;
    # the previous generation is the one just finished, at its final weights; each new one is a new initialisation.
    task = _Task([1, 0])
    method = _Recorded(SDGT.Params(steps=3, alpha=0.6, reg_coef=1e-3))
    final, result = _run(method, task, steps=6, lr=0.5)
    assert [s["gen"] for s in method.steps] == [0, 0, 1, 1, 2, 2]
    assert len(task.seeds) == 3 and len(set(task.seeds)) == 3
    x, onehot = torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    for k, s in enumerate(method.steps):
        w, b = s["student"]
        rows = s["batch"]["index"]
        probs = torch.softmax(x[rows] @ w.T + b, -1)
        label = ((probs - onehot[rows]) ** 2).mean()
        reg = 1e-3 * (w.norm() + b.norm())
        if s["gen"] == 0:
            expected = label + reg
            assert s["previous"] is None
        else:
            pw, pb = s["previous"]
            prev_probs = torch.softmax(x[rows] @ pw.T + pb, -1)
            expected = 0.6 * label + 0.4 * ((probs - prev_probs) ** 2).mean() + reg
            # The previous network is generation g - 1 at its last weights (after its last update) ...
            last = [wb for g, wb in method.after if g == s["gen"] - 1][-1]
            assert torch.equal(pw, last[0]) and torch.equal(pb, last[1])
        assert s["loss"] == pytest.approx(expected.item(), rel=1e-5), k
    for g in (1, 2):
        # ... and generation g starts from a new initialisation (the task's student for the seed it was asked),
        # not from the previous weights.
        first = next(s for s in method.steps if s["gen"] == g)
        fresh = _Task([1, 0]).student(task.seeds[g])
        assert torch.equal(first["student"][0], fresh.weight.detach())
        assert not torch.equal(first["student"][0], first["previous"][0])
    assert [i for i, _, _ in method.starts] == [0, 1, 2]
    assert method.starts[1][2] is method.starts[0][1] and method.starts[2][2] is method.starts[1][1]
    assert final is method.starts[2][1]
