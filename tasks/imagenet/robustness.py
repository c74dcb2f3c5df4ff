"""Accuracy under white-box L-infinity attacks: FGSM and PGD, in pixel space ([0, 1], before the model's
normalisation), the evaluation defensive-distillation papers report.

* FGSM (Goodfellow et al. 2015): x' = clip(x + eps * sign(grad_x CE(f(x), y)), 0, 1).
* PGD (Madry et al. 2018): a uniform random start in the eps-ball, then ``steps`` updates
  x <- clip(Proj_eps(x + alpha * sign(grad_x CE)), 0, 1). The random start uses a fixed generator, so the
  numbers are reproducible.

The attacked model is the evaluated one as deployed: for defensive distillation that is the student at
temperature 1 (its raw logits), exactly the setting of Papernot et al. 2016 and of Carlini & Wagner 2017.
The model is in eval mode; gradients are taken with respect to the input only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _grad(forward: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(forward(x).float(), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
    return g


def fgsm(forward: Callable, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    return (x + eps * _grad(forward, x, y).sign()).clamp(0, 1).detach()


def pgd(forward: Callable, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
        generator: torch.Generator | None = None) -> torch.Tensor:
    import torch

    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device) * 2 - 1
    adv = (x + eps * noise).clamp(0, 1)
    for _ in range(steps):
        adv = adv + alpha * _grad(forward, adv, y).sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1).detach()
    return adv


def robust_accuracy(forward: Callable, batches, eps: float, pgd_steps: int, pgd_alpha: float) -> dict[str, float]:
    """Top-1 accuracy on clean, FGSM and PGD inputs over ``batches`` of {"pixels", "labels"}."""
    import torch

    gen = torch.Generator().manual_seed(0)
    correct = {"clean": 0, "fgsm": 0, "pgd": 0}
    total = 0
    for batch in batches:
        x, y = batch["pixels"], batch["labels"]
        with torch.no_grad():
            correct["clean"] += int((forward(x).argmax(-1) == y).sum())
        with torch.no_grad():
            correct["fgsm"] += int((forward(fgsm(forward, x, y, eps)).argmax(-1) == y).sum())
        with torch.no_grad():
            correct["pgd"] += int((forward(pgd(forward, x, y, eps, pgd_alpha, pgd_steps, gen)).argmax(-1) == y).sum())
        total += len(y)
    return {k: v / max(1, total) for k, v in correct.items()}
