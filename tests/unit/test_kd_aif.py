"""KD with adaptive influence weights: last-layer influences on a two-point problem worked out by hand (identity and
exact damped Hessian), the Hessian solve against autograd, the clip-and-normalise weights, the weighted KD loss by
hand, the first-order meaning of an influence, and the refresh schedule of the training step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.api import Outputs
from bench.methods.kd_aif import (
    KDAIF,
    influence_weights,
    influences,
    inverse_hvp,
    layer_grads,
    logit_grads_ce,
    logit_grads_kd,
    objective_hvp,
    weighted_kd_loss,
    with_bias,
)

LN3, LN9 = math.log(3.0), math.log(9.0)

# The two-point problem. A linear classifier over K = 2 classes on a 1-d feature with a bias, at W = 0, b = 0, so the
# student predicts q = [.5, .5] everywhere (at any temperature). Both training points have feature h = 1; the teacher
# says [.75, .25] for point 1 (logits [ln 3, 0]) and [.1, .9] for point 2 (logits [0, ln 9]). One validation point,
# h = 1 with label 0. T = 1, alpha = 1 (the KD term alone).
H_TRAIN = torch.tensor([[1.0], [1.0]])
T_LOGITS = torch.tensor([[LN3, 0.0], [0.0, LN9]])
S_LOGITS = torch.zeros(2, 2)


def _two_point_grads():
    x = with_bias(H_TRAIN)
    train = layer_grads(logit_grads_kd(S_LOGITS, T_LOGITS, 1.0, 1.0), x)
    val = layer_grads(logit_grads_ce(torch.zeros(1, 2), torch.tensor([0])), with_bias(torch.tensor([[1.0]]))).mean(0)
    return x, train, val


def test_two_point_gradients_by_hand():
    # d KL / dz = q - p_t: point 1 [-.25, .25], point 2 [.4, -.4]; times x = [h, 1] = [1, 1] (rows: classes; columns:
    # weight, bias). Validation: softmax - onehot = [-.5, .5], times [1, 1].
    _, train, val = _two_point_grads()
    assert torch.allclose(train[0], torch.tensor([[-0.25, -0.25], [0.25, 0.25]]))
    assert torch.allclose(train[1], torch.tensor([[0.4, 0.4], [-0.4, -0.4]]))
    assert torch.allclose(val, torch.tensor([[-0.5, -0.5], [0.5, 0.5]]))


def test_influence_with_identity_hessian_by_hand():
    # I_i = -g_val . g_i: point 1: -(.125 + .125 + .125 + .125) = -0.5 (helpful: the teacher agrees with the validation
    # label); point 2: -(-.2 - .2 - .2 - .2) = +0.8 (harmful). Weights max(0, -I) = [.5, 0], mean-1 normalised: [2, 0].
    _, train, val = _two_point_grads()
    s, iters, _ = inverse_hvp(val, None, damping=0.01, iters=50)
    infl = influences(s, train)
    assert iters == 0
    assert torch.allclose(infl, torch.tensor([-0.5, 0.8]))
    assert torch.allclose(influence_weights(infl), torch.tensor([2.0, 0.0]))


def test_influence_with_exact_damped_hessian_by_hand():
    """H = mean_i (diag(q) - q q^T) (x) x_i x_i^T + lambda I with q = [.5, .5], x = [1, 1] for both points:
    diag(q) - q q^T = .25 [[1, -1], [-1, 1]] (eigenvalue .5 on (1, -1)/sqrt2), x x^T = [[1, 1], [1, 1]] (eigenvalue 2 on
    (1, 1)/sqrt2), so H = e e^T with e = (1, -1)/sqrt2 (x) (1, 1)/sqrt2 = [[.5, .5], [-.5, -.5]] (unit norm), and
    g_val = -e: (e e^T + lambda I)^-1 g_val = g_val / (1 + lambda). The influences are the identity-Hessian ones
    over 1.01: -0.4950495 and 0.7920792; the weights stay [2, 0]."""
    x, train, val = _two_point_grads()
    hvp = objective_hvp(S_LOGITS, x, temperature=1.0, alpha=1.0)
    e = torch.tensor([[0.5, 0.5], [-0.5, -0.5]])
    assert torch.allclose(hvp(e), e) and torch.allclose(hvp(torch.tensor([[0.5, -0.5], [0.5, -0.5]])), torch.zeros(2, 2))
    s, _, resid = inverse_hvp(val, hvp, damping=0.01, iters=50)
    assert resid < 1e-8
    infl = influences(s, train)
    assert torch.allclose(infl, torch.tensor([-0.5 / 1.01, 0.8 / 1.01]), atol=1e-6)
    assert torch.allclose(influence_weights(infl), torch.tensor([2.0, 0.0]))


def test_hessian_solve_matches_autograd_on_a_random_problem():
    """The matrix-free (H + lambda I)^-1 v equals a dense solve with the autograd Hessian of the plain objective
    mean_i [(1 - alpha) CE_i + alpha T^2 KL_i] w.r.t. the last layer (W, b)."""
    g = torch.Generator().manual_seed(0)
    n, d, k, t, alpha, lam = 6, 3, 4, 2.0, 0.7, 0.05
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    z_t = torch.randn(n, k, generator=g, dtype=torch.float64)
    theta0 = torch.randn(k, d + 1, generator=g, dtype=torch.float64) * 0.5

    def objective(flat):
        w = flat.view(k, d + 1)
        z = h @ w[:, :d].T + w[:, d]
        p_t = F.softmax(z_t / t, -1)
        kl = (p_t * (p_t.log() - F.log_softmax(z / t, -1))).sum(-1)
        return ((1 - alpha) * F.cross_entropy(z, y, reduction="none") + alpha * t * t * kl).mean()

    dense = torch.autograd.functional.hessian(objective, theta0.flatten())
    v = torch.randn(k, d + 1, generator=g, dtype=torch.float64)
    expected = torch.linalg.solve(dense + lam * torch.eye(k * (d + 1), dtype=torch.float64), v.flatten()).view(k, d + 1)
    z0 = h @ theta0[:, :d].T + theta0[:, d]
    hvp = objective_hvp(z0, with_bias(h), t, alpha)
    assert torch.allclose(hvp(v).flatten(), dense @ v.flatten(), atol=1e-10)
    s, _, _ = inverse_hvp(v, hvp, lam, iters=200)
    assert torch.allclose(s, expected, atol=1e-8)
    # and the per-example KD gradient is autograd's gradient of alpha T^2 KL_i w.r.t. (W, b)
    flat = theta0.flatten().clone().requires_grad_(True)
    w = flat.view(k, d + 1)
    z = h[:1] @ w[:, :d].T + w[:, d]
    p_t = F.softmax(z_t[:1] / t, -1)
    (alpha * t * t * (p_t * (p_t.log() - F.log_softmax(z / t, -1))).sum()).backward()
    mine = layer_grads(logit_grads_kd(z0[:1], z_t[:1], t, alpha), with_bias(h[:1]))[0]
    assert torch.allclose(mine.flatten(), flat.grad, atol=1e-10)


def test_an_influence_predicts_the_validation_loss_change_of_a_small_step():
    """With the identity Hessian, I_i = -g_val . g_i is the first-order change of the validation loss per unit step
    along -g_i: L_val(theta - eta g_i) - L_val(theta) ~ eta I_i."""
    g = torch.Generator().manual_seed(1)
    h, z_t = torch.randn(3, 2, generator=g).double(), torch.randn(3, 3, generator=g).double()
    hv, yv = torch.randn(4, 2, generator=g).double(), torch.randint(0, 3, (4,), generator=g)
    layer = nn.Linear(2, 3).double()

    def val_loss(weight, bias):
        return F.cross_entropy(hv @ weight.T + bias, yv).item()

    with torch.no_grad():
        z = layer(h)
        train = layer_grads(logit_grads_kd(z, z_t, 4.0, 0.9), with_bias(h))
        val = layer_grads(logit_grads_ce(layer(hv), yv), with_bias(hv)).mean(0)
        infl = influences(val, train)
        eta = 1e-6
        for i in range(3):
            w, b = layer.weight - eta * train[i, :, :2], layer.bias - eta * train[i, :, 2]
            change = val_loss(w, b) - val_loss(layer.weight, layer.bias)
            assert change / eta == pytest.approx(infl[i].item(), rel=1e-3, abs=1e-6)


def test_weights_clip_and_normalise_to_mean_one():
    # -I = [1, 3, -2, 0] -> clipped [1, 3, 0, 0], sum 4 over 4 examples -> mean 1 as is.
    assert torch.allclose(influence_weights(torch.tensor([-1.0, -3.0, 2.0, 0.0])), torch.tensor([1.0, 3.0, 0.0, 0.0]))
    assert torch.allclose(influence_weights(torch.tensor([-1.0, -1.0, 0.0])), torch.tensor([1.5, 1.5, 0.0]))
    # no helpful example: uniform
    assert torch.allclose(influence_weights(torch.tensor([0.5, 0.0])), torch.ones(2))


def test_weighted_kd_loss_by_hand():
    # KL([.75, .25] || [.5, .5]) = .75 ln 1.5 + .25 ln .5 = 0.1308120; KL([.1, .9] || [.5, .5]) = .1 ln .2 + .9 ln 1.8
    # = 0.3680631. Weights [2, 0]: mean(w KL) = 0.1308120 (unweighted: 0.2494376).
    total, soft = weighted_kd_loss(S_LOGITS, T_LOGITS, torch.tensor(5.0), torch.tensor([2.0, 0.0]), 1.0, 1.0)
    assert soft.item() == pytest.approx(0.1308120, abs=1e-6) and total.item() == pytest.approx(0.1308120, abs=1e-6)
    _, plain = weighted_kd_loss(S_LOGITS, T_LOGITS, torch.tensor(0.0), torch.ones(2), 1.0, 1.0)
    assert plain.item() == pytest.approx((0.1308120 + 0.3680631) / 2, abs=1e-6)
    # T = 2: point 1's teacher is softmax([ln 3 / 2, 0]) = [.6339746, .3660254], KL = 0.0363408, x T^2 = 0.1453631;
    # alpha = .5 with a label loss of 1: .5 * 1 + .5 * (2 * 0.1453631 + 0) / 2.
    total, soft = weighted_kd_loss(S_LOGITS, T_LOGITS, torch.tensor(1.0), torch.tensor([2.0, 0.0]), 2.0, 0.5)
    assert soft.item() == pytest.approx(0.1453631, abs=1e-6)
    assert total.item() == pytest.approx(0.5 + 0.5 * 0.1453631, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# The training step on the two-point problem
# --------------------------------------------------------------------------------------------------


class _Task:
    def forward(self, model, batch):
        return Outputs(logits=model(batch["x"]))


class _Ctx:
    def __init__(self, student):
        self.task, self.student, self.step = _Task(), student, 0
        self.val = {"x": torch.tensor([[1.0]]), "labels": torch.tensor([0]), "index": torch.tensor([99])}
        self.calibration_calls = 0

    def teacher_outputs(self, batch):
        return Outputs(logits=T_LOGITS)

    def label_loss(self, out, batch):
        return F.cross_entropy(out.logits, batch["labels"])

    def calibration_batches(self, n):
        self.calibration_calls += 1
        return [self.val]


def test_training_step_weights_the_kd_term_by_influence():
    student = nn.Linear(1, 2)
    nn.init.zeros_(student.weight)
    nn.init.zeros_(student.bias)
    method = KDAIF(KDAIF.Params(temperature=1.0, alpha=1.0, hessian="identity", refresh_every=3, val_batches=1))
    ctx = _Ctx(student)
    batch = {"x": H_TRAIN, "labels": torch.tensor([0, 1]), "index": torch.tensor([0, 1])}
    loss = method.training_step(batch, ctx)["student"]
    assert loss.item() == pytest.approx(0.1308120, abs=1e-6)  # weights [2, 0], as worked out above
    assert method.on_step_end(ctx)["weight_zero_fraction"] == 0.5
    assert torch.allclose(method.s.float(), torch.tensor([[-0.5, -0.5], [0.5, 0.5]]))
    # The validation term is re-estimated at steps 0, 3, 6: three refreshes over steps 0..6.
    for step in range(1, 7):
        ctx.step = step
        method.training_step(batch, ctx)
    assert ctx.calibration_calls == 3 and method.record_info()["refreshes"] == 3
    assert method.record_info()["last_refresh_step"] == 6
    restored = KDAIF(method.params)
    restored.load_state_dict(method.state_dict())
    assert torch.equal(restored.s, method.s.cpu()) and restored.info == method.info


def test_regression_is_unsupported():
    class Reg:
        def problem(self):
            return "regression"

    assert "regression" in KDAIF(KDAIF.Params()).unsupported(Reg())
