"""SD-GT (Borup & Andersen 2021): the mixed MSE-on-probabilities target, the norm penalty and the
generations, against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from bench.methods.sd_gt import SDGT, norm_penalty, sd_gt_loss

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
