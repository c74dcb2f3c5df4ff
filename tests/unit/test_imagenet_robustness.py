"""FGSM and PGD in pixel space, checked on a linear model whose input gradient's sign is known by hand."""

from __future__ import annotations

import math

import pytest
import torch
from bench.tasks.imagenet.robustness import fgsm, pgd, robust_accuracy


def linear(x: torch.Tensor) -> torch.Tensor:
    """Two classes with logits (s, -s), s = sum of the pixels: the loss of class 0 falls as pixels rise."""
    s = x.flatten(1).sum(1)
    return torch.stack([s, -s], dim=1)


def test_fgsm_steps_each_pixel_by_eps_against_the_label():
    x = torch.full((2, 1, 2, 2), 0.5)
    y = torch.tensor([0, 1])
    adv = fgsm(linear, x, y, eps=0.1)
    # Class 0: the loss decreases with s, so the attack lowers every pixel; class 1 the opposite.
    assert torch.allclose(adv[0], torch.full((1, 2, 2), 0.4)) and torch.allclose(adv[1], torch.full((1, 2, 2), 0.6))
    # Pixels stay in [0, 1].
    assert fgsm(linear, torch.zeros(1, 1, 1, 1), torch.tensor([0]), 0.1).item() == 0.0


def test_pgd_stays_in_the_ball_and_reaches_its_corner():
    x = torch.full((1, 1, 3, 3), 0.5)
    adv = pgd(linear, x, torch.tensor([0]), eps=8 / 255, alpha=2 / 255, steps=10, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 8 / 255 + 1e-7 and adv.min() >= 0 and adv.max() <= 1
    assert torch.allclose(adv, x - 8 / 255), "ten steps of 2/255 from anywhere in the ball reach its lower corner"


def test_robust_accuracy_counts_clean_and_attacked_hits():
    def centred(x):  # logits (s - 8, 8 - s) over 16 pixels: class 0 wins when the mean pixel exceeds .5
        s = x.flatten(1).sum(1) - 8.0
        return torch.stack([s, -s], dim=1)

    # Mean pixel .52: class 0 is right on the clean input; an eps of .05 moves every pixel to .47: wrong.
    batch = {"pixels": torch.full((4, 1, 4, 4), 0.52), "labels": torch.tensor([0, 0, 0, 0])}
    acc = robust_accuracy(centred, [batch], eps=0.05, pgd_steps=5, pgd_alpha=0.02)
    assert acc == {"clean": 1.0, "fgsm": 0.0, "pgd": 0.0}
    # With eps .01 no pixel can cross .5: the attacks fail.
    assert robust_accuracy(centred, [batch], eps=0.01, pgd_steps=5, pgd_alpha=0.005) == {"clean": 1.0, "fgsm": 1.0, "pgd": 1.0}


# --- Carlini & Wagner L2 ------------------------------------------------------------------------------------------


def test_cw_f_is_the_label_margin_clamped_at_minus_kappa():
    from bench.tasks.imagenet.robustness import cw_f

    z = torch.tensor([[3.0, 1.0, 2.0]] * 3)
    # y = 0: Z_y - max_{i != y} Z_i = 3 - 2 = 1 (not clamped); y = 1: 1 - 3 = -2; y = 2: 2 - 3 = -1.
    assert cw_f(z, torch.tensor([0, 1, 2]), 0.0).tolist() == [1.0, 0.0, 0.0]
    assert cw_f(z, torch.tensor([0, 1, 2]), 0.5).tolist() == [1.0, -0.5, -0.5]
    assert cw_f(z, torch.tensor([0, 1, 2]), 5.0).tolist() == [1.0, -2.0, -1.0]


def test_cw_objective_and_its_gradient_on_a_linear_model_by_hand():
    from bench.tasks.imagenet.robustness import cw_objective

    W = torch.tensor([[1.5, -0.5], [0.2, 1.0]])
    b = torch.tensor([0.1, -0.2])
    x = torch.tensor([[0.6, 0.3], [0.6, 0.3]])
    w = torch.tensor([[0.4, -0.7], [0.4, -0.7]], requires_grad=True)
    y = torch.tensor([0, 1])
    c = torch.tensor([0.7, 0.7])
    loss, l2sq, adv, _ = cw_objective(lambda v: v @ W.T + b, w, x, y, c, 0.0)
    # By hand: x' = (tanh(w) + 1) / 2; Z_0 - Z_1 = (w_0 - w_1) . x' + (b_0 - b_1) = 1.3 x'_0 - 1.5 x'_1 + 0.3.
    xp = [(math.tanh(0.4) + 1) / 2, (math.tanh(-0.7) + 1) / 2]
    d2 = (xp[0] - 0.6) ** 2 + (xp[1] - 0.3) ** 2
    margin = 1.3 * xp[0] - 1.5 * xp[1] + 0.3
    assert margin > 0  # label 0 is predicted: f = margin for y = 0; for y = 1, f = max(-margin, 0) = 0
    assert adv[0].tolist() == pytest.approx(xp, abs=1e-6) and l2sq[0].item() == pytest.approx(d2, rel=1e-5)
    assert loss.tolist() == pytest.approx([d2 + 0.7 * margin, d2], rel=1e-5)
    (g,) = torch.autograd.grad(loss.sum(), w)
    # d/dw = (2 (x' - x) + c df/dx') * dx'/dw, dx'/dw = (1 - tanh(w)^2) / 2; df/dx' = w_0 - w_1 = (1.3, -1.5) for y = 0,
    # and 0 for y = 1 (f is clamped at -kappa = 0).
    jac = [(1 - math.tanh(0.4) ** 2) / 2, (1 - math.tanh(-0.7) ** 2) / 2]
    g0 = [(2 * (xp[i] - [0.6, 0.3][i]) + 0.7 * [1.3, -1.5][i]) * jac[i] for i in range(2)]
    g1 = [2 * (xp[i] - [0.6, 0.3][i]) * jac[i] for i in range(2)]
    assert g[0].tolist() == pytest.approx(g0, rel=1e-5) and g[1].tolist() == pytest.approx(g1, rel=1e-5)


def test_cw_finds_the_minimal_l2_crossing_of_a_linear_model():
    from bench.tasks.imagenet.robustness import cw_l2

    # Z = W x + b, two classes, label 0. The boundary is (w_0 - w_1) . x + (b_0 - b_1) = 0 with w_0 - w_1 = (2, -1),
    # b_0 - b_1 = -0.3: the nearest crossing is at distance margin / ||w_0 - w_1|| = margin / sqrt(5), at
    # x - margin / 5 * (2, -1), inside the box for both points.
    W = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([0.0, 0.3])
    x = torch.tensor([[0.7, 0.4], [0.6, 0.45]])
    margins = [1.4 - 0.4 - 0.3, 1.2 - 0.45 - 0.3]
    adv, success, l2 = cw_l2(lambda v: v @ W.T + b, x, torch.tensor([0, 0]), steps=100, binary_steps=8)
    assert success.tolist() == [True, True]
    for i, m in enumerate(margins):
        closest = [x[i, 0].item() - m / 5 * 2, x[i, 1].item() + m / 5]
        assert l2[i].item() >= m / math.sqrt(5) - 1e-6, "no adversarial point is nearer than the boundary"
        assert l2[i].item() == pytest.approx(m / math.sqrt(5), rel=2e-3)
        assert adv[i].tolist() == pytest.approx(closest, abs=1e-2)  # the L2 is flat along the boundary
        assert (adv[i] @ (W[0] - W[1]) + (b[0] - b[1])).item() < 0, "the returned point is misclassified"


def test_cw_accuracy_counts_robust_correct_examples_and_mean_l2_of_successes():
    from bench.tasks.imagenet.robustness import cw_accuracy

    def reachable(v):  # Z_0 - Z_1 = 2 (x_0 - 0.5): class 0 iff x_0 > .5, a boundary inside the box
        s = 2 * (v[:, 0] - 0.5)
        return torch.stack([s, -s], dim=1)

    def unreachable(v):  # Z_0 - Z_1 = x_0 - x_1 + 1.5 >= 0.5 on the whole box: class 0 everywhere
        s = v[:, 0] - v[:, 1] + 1.5
        return torch.stack([s, torch.zeros_like(s)], dim=1)

    # Two correct points at distances .1 and .3 from x_0 = .5: both attacked, mean L2 .2.
    batch = {"pixels": torch.tensor([[0.6, 0.5], [0.8, 0.5]]), "labels": torch.tensor([0, 0])}
    out = cw_accuracy(reachable, [batch], steps=100, binary_steps=9)
    assert out["top1"] == 0.0 and out["l2"] == pytest.approx(0.2, rel=5e-3)
    # No example of class 1 exists in the box: the correct label-0 point is robust; the label-1 point is
    # misclassified already (not robust) and its zero-length "perturbation" is not averaged.
    batch = {"pixels": torch.tensor([[0.6, 0.5], [0.6, 0.5]]), "labels": torch.tensor([0, 1])}
    out = cw_accuracy(unreachable, [batch], steps=20, binary_steps=3)
    assert out["top1"] == 0.5 and math.isnan(out["l2"])
