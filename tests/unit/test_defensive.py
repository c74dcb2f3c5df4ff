"""Defensive distillation (Papernot et al. 2016): both losses at temperature T by hand, two generations,
and the student used at T = 1."""

from __future__ import annotations

import math

import pytest
import torch
from bench.methods.defensive import Defensive, hard_label_loss, soft_label_loss


def test_initial_network_loss_at_temperature():
    # z = [2, 0], T = 2: softmax(z / T) = softmax([1, 0]); CE(y = 0) = ln(1 + e^-1).
    assert hard_label_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), 2.0).item() == pytest.approx(
        math.log(1 + math.exp(-1)), rel=1e-6)


def test_distilled_network_loss_at_temperature():
    # Teacher [4, 0] at T = 2 gives soft labels softmax([2, 0]); a student at [0, 0] predicts [.5, .5]: CE = ln 2.
    assert soft_label_loss(torch.zeros(1, 2), torch.tensor([[4.0, 0.0]]), 2.0).item() == pytest.approx(math.log(2))
    # Student [2, 0] at T = 2 predicts softmax([1, 0]) = [s, 1 - s]; soft labels [r, 1 - r] with r = softmax([2, 0])_0.
    s, r = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-2))
    expected = -(r * math.log(s) + (1 - r) * math.log(1 - s))
    assert soft_label_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([[4.0, 0.0]]), 2.0).item() == pytest.approx(expected, rel=1e-6)


def test_two_fresh_networks_and_temperature_100():
    method = Defensive(Defensive.Params())
    assert method.params.temperature == 100.0
    plan = method.generations(9)
    assert [g.steps for g in plan] == [5, 4] and all(g.fresh_student for g in plan)
    assert Defensive.uses_task_teacher is False
    assert method.record_info()["evaluated_at_temperature"] == 1.0
