"""TAID (Shing et al., ICLR 2025) against numbers worked out by hand from the paper's and official
code's formulas (SakanaAI/TAID src/distil_losses/taid.py), not against the implementation's output."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from bench.methods.taid import TAID, TAIDSchedule, taid_loss, taid_target


def test_target_interpolates_logits_not_probabilities():
    # z_s = [1, 0, -1], z_t = [0, 2, 0], t = 0.4: (1 - t) z_s + t z_t = [0.6, 0.8, -0.6];
    # exp -> [1.8221188, 2.2255409, 0.5488116], sum 4.5964713.
    s = torch.tensor([[1.0, 0.0, -1.0]])
    t = torch.tensor([[0.0, 2.0, 0.0]])
    p = taid_target(s, t, 0.4)
    assert p[0].tolist() == pytest.approx([0.3964169, 0.4841847, 0.1193985], abs=1e-6)
    # A probability mixture 0.6 softmax(z_s) + 0.4 softmax(z_t) would give [0.4386, 0.5340, 0.0940]:
    assert p[0, 0].item() != pytest.approx(0.4386, abs=1e-3)


def test_target_endpoints_and_stop_gradient():
    s = torch.tensor([[2.0, -1.0, 0.5]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0, 3.0]])
    assert torch.allclose(taid_target(s, t, 0.0), torch.softmax(s.detach(), -1))
    assert torch.allclose(taid_target(s, t, 1.0), torch.softmax(t, -1))
    assert not taid_target(s, t, 0.5).requires_grad


def test_loss_is_cross_entropy_to_the_target():
    # log softmax(z_s) = [-0.4076059, -1.4076059, -2.4076059];
    # J = 0.3964169 * 0.4076059 + 0.4841847 * 1.4076059 + 0.1193985 * 2.4076059 = 1.1305876
    s = torch.tensor([[1.0, 0.0, -1.0]], requires_grad=True)
    t = torch.tensor([[0.0, 2.0, 0.0]])
    loss = taid_loss(s, t, 0.4)
    assert loss.item() == pytest.approx(1.1305876, abs=1e-6)
    # Gradient of CE with a constant target: softmax(z_s) - p_t.
    loss.backward()
    expected = torch.tensor([[0.6652410 - 0.3964169, 0.2447285 - 0.4841847, 0.0900306 - 0.1193985]])
    assert torch.allclose(s.grad, expected, atol=1e-6)


def test_loss_averages_over_examples():
    s = torch.tensor([[1.0, 0.0, -1.0], [1.0, 0.0, -1.0]])
    t = torch.tensor([[0.0, 2.0, 0.0], [0.0, 2.0, 0.0]])
    assert taid_loss(s, t, 0.4).item() == pytest.approx(1.1305876, abs=1e-6)


def test_regression_adaptation_is_half_squared_error_to_interpolated_mean():
    # target mean = 0.6 * 1.0 + 0.4 * 3.0 = 1.8; 0.5 * (1.0 - 1.8)^2 = 0.32
    s = torch.tensor([[1.0]])
    t = torch.tensor([[3.0]])
    assert taid_loss(s, t, 0.4, regression=True).item() == pytest.approx(0.32, abs=1e-7)


def test_first_update_only_records_the_loss():
    sch = TAIDSchedule(0.4, 1.0, alpha=0.5, beta=0.99)
    assert sch.update(2.0, step=0, total_steps=10) is None
    assert sch.t == 0.4 and sch.prev_loss == 2.0 and sch.momentum == 0.0


def test_adaptive_updates_by_hand():
    # alpha = 0.5 so that the adaptive step beats the linear floor; N = 10 steps.
    sch = TAIDSchedule(0.4, 1.0, alpha=0.5, beta=0.99)
    sch.update(2.0, 0, 10)
    # step 1, loss 1.5: delta = 0.5/2 = 0.25; m = 0.01 * 0.25 = 0.0025; sigmoid(m) = 0.500625;
    # dt = 0.5 * 0.500625 * 0.6 = 0.1501875; floor 0.46 -> t = 0.5501875
    sch.update(1.5, 1, 10)
    assert sch.momentum == pytest.approx(0.0025, abs=1e-12)
    assert sch.t == pytest.approx(0.5501875, abs=1e-9)
    # step 2, loss 1.2: delta = 0.3/1.5 = 0.2; m = 0.99 * 0.0025 + 0.002 = 0.004475;
    # sigmoid = 0.50111875; dt = 0.5 * 0.50111875 * 0.4498125 = 0.1127047 -> t = 0.6628922 (> floor 0.52)
    sch.update(1.2, 2, 10)
    assert sch.momentum == pytest.approx(0.004475, abs=1e-12)
    assert sch.t == pytest.approx(0.6628922, abs=1e-6)
    # step 3, loss 1.3 (worse): delta = -0.1/1.2 = -0.0833333; m = 0.00443025 - 0.000833333 = 0.0035969;
    # sigmoid = 0.5008992; dt = 0.5 * 0.5008992 * 0.3371078 = 0.0844285 -> t = 0.7473207 (> floor 0.58)
    sch.update(1.3, 3, 10)
    assert sch.momentum == pytest.approx(0.0035969167, abs=1e-9)
    assert sch.t == pytest.approx(0.7473207, abs=1e-6)


def test_linear_floor_wins_with_the_paper_alpha():
    sch = TAIDSchedule(0.4, 1.0, alpha=5e-4, beta=0.99)
    sch.update(2.0, 0, 10)
    sch.update(1.5, 1, 10)  # dt = 5e-4 * 0.500625 * 0.6 = 1.5e-4 << floor step 0.06
    assert sch.t == pytest.approx(0.46)
    sch.update(1.2, 2, 10)
    assert sch.t == pytest.approx(0.52)


def test_t_is_capped_at_t_end_and_monotone():
    sch = TAIDSchedule(0.4, 0.7, alpha=0.5, beta=0.99)
    ts = []
    for step, loss in enumerate([2.0, 1.5, 1.2, 1.3, 1.0, 3.0]):
        sch.update(loss, step, 10)
        ts.append(sch.t)
    assert max(ts) == pytest.approx(0.7)
    assert all(b >= a for a, b in zip(ts, ts[1:]))


def test_non_adaptive_follows_the_ramp():
    sch = TAIDSchedule(0.2, 1.0, alpha=0.5, beta=0.99, adaptive=False)
    sch.update(1.0, 0, 8)
    for step in range(1, 5):
        sch.update(0.5, step, 8)
        assert sch.t == pytest.approx(0.2 + 0.8 * step / 8)


def test_sigmoid_used_is_the_logistic_function():
    sch = TAIDSchedule(0.0, 1.0, alpha=1.0, beta=0.0)
    sch.update(1.0, 0, 1000)
    sch.update(0.0, 1, 1000)  # delta = 1, m = 1, dt = sigmoid(1) * 1 = 0.7310586
    assert sch.t == pytest.approx(1 / (1 + math.exp(-1)), abs=1e-9)


class _Ctx:
    """The slice of the harness context TAID uses."""

    def __init__(self, student_logits, teacher_logits, total_steps):
        self.s, self.t, self.total_steps, self.step = student_logits, teacher_logits, total_steps, 0

    def student_outputs(self, batch):
        from bench.api import Outputs

        return Outputs(logits=self.s)

    def teacher_outputs(self, batch):
        from bench.api import Outputs

        return Outputs(logits=self.t)

    def problem(self):
        return "classification"

    def label_loss(self, out, batch):
        return torch.nn.functional.cross_entropy(out.logits, batch["labels"])


def test_method_updates_t_once_per_training_step_with_the_steps_own_index():
    method = TAID(TAID.Params(alpha=0.5))
    ctx = _Ctx(torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.0]]), total_steps=10)
    batch = {"labels": torch.tensor([1])}
    losses = method.training_step(batch, ctx)
    assert losses["student"].item() == pytest.approx(1.1305876, abs=1e-6)  # pure TAID, r = 1
    method.on_step_end(ctx)
    assert method.schedule.t == 0.4  # first call only records the loss
    # Evaluation never calls on_step_end, so t cannot move outside training.
    ctx.step = 1
    method.training_step(batch, ctx)
    method.on_step_end(ctx)
    # same loss twice -> delta 0, m 0, dt = 0.5 * 0.5 * 0.6 = 0.15; floor 0.46 -> 0.55
    assert method.schedule.t == pytest.approx(0.55)
    state = method.state_dict()
    fresh = TAID(TAID.Params(alpha=0.5))
    fresh.load_state_dict(state)
    assert fresh.schedule.t == method.schedule.t


def test_distil_ratio_mixes_the_label_loss():
    method = TAID(TAID.Params(distil_ratio=0.25))
    ctx = _Ctx(torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.0]]), total_steps=10)
    loss = method.training_step({"labels": torch.tensor([1])}, ctx)["student"]
    ce = 1.4076059  # -log softmax(z_s)[1]
    assert loss.item() == pytest.approx(0.75 * ce + 0.25 * 1.1305876, abs=1e-6)


@pytest.mark.parametrize("field,value", [("t_start", 2), ("t_start", 1.0), ("t_end", 0.0), ("alpha", 1.5)])
def test_params_bounds_from_the_official_asserts(field, value):
    with pytest.raises(ValidationError):
        TAID.Params(**{field: value})


def test_params_reject_start_after_end():
    with pytest.raises(ValidationError, match="t_start"):
        TAID.Params(t_start=0.8, t_end=0.5)


def test_classification_rows_say_the_language_model_defaults_are_used():
    from types import SimpleNamespace

    from bench.methods.taid import TAID

    method = TAID(TAID.Params())
    (note,) = method.table_notes(SimpleNamespace(domain="classification"))
    assert "no classification setting" in note and "t_start 0.4" in note
    assert method.table_notes(SimpleNamespace(domain="lm")) == []
