"""FGSM and PGD in pixel space, checked on a linear model whose input gradient's sign is known by hand."""

from __future__ import annotations

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
