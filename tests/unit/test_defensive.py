"""Defensive distillation (Papernot et al. 2016): both losses at temperature T by hand, two generations,
and the student used at T = 1."""

from __future__ import annotations

import math

import pytest
import torch
from bench.methods.defensive import Defensive, hard_label_loss, soft_label_loss

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _generation_harness import TwoExampleTask as _Task, recorded, run as _run  # noqa: E402

LN3 = math.log(3.0)


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


# --------------------------------------------------------------------------------------------------
# The two networks, driven through the harness loop (bench.train.train) on a two-example task
# --------------------------------------------------------------------------------------------------


_Recorded = recorded(Defensive)


def test_the_initial_network_fits_labels_at_t_then_a_fresh_one_fits_its_soft_labels_at_t_by_hand():
    # lr 0: each network keeps its hand-made initialisation. T = 2, labels [0, 1].
    # F (generation index 0): logits ex0 = [0, 0], ex1 = [ln 3, 0] (+ .5 each, an equal shift). At T: softmax([0, 0])
    # = [.5, .5] and softmax([ln 3 / 2, 0]) = [s, 1 - s], s = sqrt 3 / (1 + sqrt 3). CE to the hard labels:
    # (ln 2 + ln(1 + sqrt 3)) / 2 (label 1 of ex1 has probability 1 / (1 + sqrt 3)).
    # F^d (index 1, fresh): logits ex0 = [ln 3, 0], ex1 = [0, 0] (+ 1); at T its predictions are [s, 1 - s] and
    # [.5, .5]; F's soft labels at T are [.5, .5] and [s, 1 - s]. Soft CE: ex0 -(.5 ln s + .5 ln(1 - s))
    # = ln(1 + sqrt 3) - ln(3) / 4; ex1 -(s ln .5 + (1 - s) ln .5) = ln 2. No label term, no T^2.
    inits = [([[0.0, LN3], [0.0, 0.0]], [0.5, 0.5]), ([[LN3, 0.0], [0.0, 0.0]], [1.0, 1.0])]
    for labels, first in (([0, 1], (math.log(2) + math.log(1 + math.sqrt(3))) / 2),
                          ([1, 0], (math.log(2) + math.log(1 + 1 / math.sqrt(3))) / 2)):
        task = _Task(labels, inits)
        method = _Recorded(Defensive.Params(temperature=2.0))
        _run(method, task, steps=4, lr=0.0)
        assert [s["gen"] for s in method.steps] == [0, 0, 1, 1] and len(task.seeds) == 2
        second = (math.log(1 + math.sqrt(3)) - math.log(3) / 4 + math.log(2)) / 2  # the same whatever the labels
        assert [s["loss"] for s in method.steps] == pytest.approx([first, first, second, second], rel=1e-6)


def test_the_distilled_network_is_fresh_and_learns_the_trained_initial_network_at_t():
    # Trained for real at T = 100 (lr 50, so the scaled logits move): each loss recomputed in plain torch from the
    # weights the step saw; F^d's teacher is F at its final weights; F^d starts from a new initialisation.
    task = _Task([1, 0])
    method = _Recorded(Defensive.Params())
    assert method.params.temperature == 100.0
    final, _ = _run(method, task, steps=6, lr=50.0)
    assert [s["gen"] for s in method.steps] == [0, 0, 0, 1, 1, 1] and len(set(task.seeds)) == 2
    x, labels, T = torch.eye(2), torch.tensor([1, 0]), 100.0
    for k, s in enumerate(method.steps):
        w, b = s["student"]
        rows = s["batch"]["index"]
        log_q = torch.log_softmax((x[rows] @ w.T + b) / T, -1)
        if s["gen"] == 0:
            assert s["previous"] is None
            expected = -log_q[torch.arange(2), labels[rows]].mean()
        else:
            pw, pb = s["previous"]
            last = [wb for g, wb in method.after if g == 0][-1]
            assert torch.equal(pw, last[0]) and torch.equal(pb, last[1])
            target = torch.softmax((x[rows] @ pw.T + pb) / T, -1)
            expected = -(target * log_q).sum(-1).mean()
        assert s["loss"] == pytest.approx(expected.item(), rel=1e-5), k
    first = next(s for s in method.steps if s["gen"] == 1)
    fresh = _Task([1, 0]).student(task.seeds[1])
    assert torch.equal(first["student"][0], fresh.weight.detach())
    assert not torch.equal(first["student"][0], first["previous"][0])
    trained_f = [wb for g, wb in method.after if g == 0][-1][0]
    assert not torch.equal(trained_f, method.steps[0]["student"][0]), "F was trained before it was distilled"
    # At test time the distilled network is used as it is: its raw logits (T = 1).
    assert final is method.starts[1][1]
    with torch.no_grad():
        assert torch.allclose(final(x), x @ final.weight.T + final.bias)
