"""Accuracy under white-box attacks in pixel space ([0, 1], before the model's normalisation), the evaluation
defensive-distillation papers report: FGSM and PGD (L-infinity) and Carlini & Wagner's L2 attack.

* FGSM (Goodfellow et al. 2015): x' = clip(x + eps * sign(grad_x CE(f(x), y)), 0, 1).
* PGD (Madry et al. 2018): a uniform random start in the eps-ball, then ``steps`` updates
  x <- clip(Proj_eps(x + alpha * sign(grad_x CE)), 0, 1). The random start uses a fixed generator, so the
  numbers are reproducible.

* Carlini & Wagner's L2 attack (C&W, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017,
  section V; the authors' code carlini/nn_robust_attacks ``l2_attack.py``), untargeted. The change of variables
  x' = (tanh(w) + 1) / 2 keeps x' in the [0, 1] box; Adam on w minimises, per example,

      ||x' - x||_2^2 + c * f(x'),    f(x') = max(Z(x')_y - max_{i != y} Z(x')_i, -kappa)

  (Z the logits, y the label, kappa the confidence), for a fixed number of steps from w = artanh(2x - 1), with
  Adam's state and w reset for each c. c is found by binary search per example, as the code does: it starts at
  ``initial_const``; after a search step in which some iterate was adversarial the upper bound becomes c and c
  the midpoint of the bounds; otherwise the lower bound becomes c and c is multiplied by 10 (or set to the
  midpoint once an upper bound exists). An iterate is adversarial when max_{i != y} Z_i > Z_y + kappa; the
  attack returns, per example, the adversarial iterate of least L2 over every c and step, or the input itself
  when none was found. Accuracy under the attack is the top-1 on what it returns: an example is robust when it
  is classified correctly and no c gave an adversarial example.
  Deviations: the code's box is [-0.5, 0.5] (the same change of variables, shifted); its default budget is
  10,000 Adam steps with early abort and 9 search steps, fewer here for cost (the task's ``cw_*`` parameters),
  and no early abort (a fixed number of steps, so the cost and the result do not depend on the loss curve).
  The attack is deterministic: it has no random start.

The attacked model is the evaluated one as deployed: for defensive distillation that is the student at
temperature 1 (its raw logits), exactly the setting of Papernot et al. 2016 and of Carlini & Wagner 2017 (whose
attack on logits, not on softmax outputs, is what defeats defensive distillation).
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


# --------------------------------------------------------------------------------------------------
# Carlini & Wagner L2 (module docstring)
# --------------------------------------------------------------------------------------------------


def label_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Z_y - max_{i != y} Z_i, one value per example."""
    real = logits.gather(1, y[:, None])
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return real.squeeze(1) - other


def cw_f(logits: torch.Tensor, y: torch.Tensor, kappa: float) -> torch.Tensor:
    """C&W's untargeted f(x') = max(Z_y - max_{i != y} Z_i, -kappa), one value per example."""
    return label_margin(logits, y).clamp(min=-kappa)


def to_box(w: torch.Tensor) -> torch.Tensor:
    """x' = (tanh(w) + 1) / 2: any w maps into the [0, 1] pixel box."""
    return (w.tanh() + 1) / 2


def from_box(x: torch.Tensor) -> torch.Tensor:
    """w with to_box(w) = x (up to the code's factor 0.999999, which keeps artanh finite at 0 and 1)."""
    return ((2 * x - 1) * 0.999999).atanh()


def cw_objective(forward: Callable, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, const: torch.Tensor,
                 kappa: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example ||x' - x||^2 + c f(x') at x' = to_box(w); returns it, the squared L2, x' and the label margin
    Z_y - max_{i != y} Z_i (f is that margin clamped at -kappa)."""
    adv = to_box(w)
    margin = label_margin(forward(adv).float(), y)
    l2sq = (adv - x).flatten(1).pow(2).sum(1)
    return l2sq + const * margin.clamp(min=-kappa), l2sq, adv, margin


def cw_l2(forward: Callable, x: torch.Tensor, y: torch.Tensor, *, confidence: float = 0.0, steps: int = 100,
          binary_steps: int = 5, initial_const: float = 1e-3, lr: float = 1e-2
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The untargeted C&W L2 attack on a batch: (returned images, found-adversarial mask, L2 of each returned
    perturbation; inf where none was found). See the module docstring."""
    import torch

    x = x.detach().float()
    n = x.shape[0]
    dev = x.device
    lower = torch.zeros(n, device=dev)
    upper = torch.full((n,), 1e10, device=dev)
    const = torch.full((n,), float(initial_const), device=dev)
    best_l2sq = torch.full((n,), float("inf"), device=dev)
    best_adv = x.clone()
    w0 = from_box(x)
    for _ in range(binary_steps):
        w = w0.clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=lr)  # the code resets Adam and w for every c
        found = torch.zeros(n, dtype=torch.bool, device=dev)
        for _ in range(steps):
            with torch.enable_grad():
                loss, l2sq, adv, margin = cw_objective(forward, w, x, y, const, confidence)
                (grad,) = torch.autograd.grad(loss.sum(), w)
            with torch.no_grad():
                # The iterate before this step, as the code records it (its values come from the same run as the step).
                hit = margin < -confidence  # max_{i != y} Z_i > Z_y + kappa
                found |= hit
                better = hit & (l2sq < best_l2sq)
                best_l2sq = torch.where(better, l2sq, best_l2sq)
                best_adv[better] = adv[better].detach()
            w.grad = grad
            opt.step()
        with torch.no_grad():
            upper = torch.where(found, torch.minimum(upper, const), upper)
            lower = torch.where(found, lower, torch.maximum(lower, const))
            bounded = upper < 1e9
            const = torch.where(bounded, (lower + upper) / 2, const * 10)
    success = torch.isfinite(best_l2sq)
    return best_adv, success, best_l2sq.sqrt()


def cw_accuracy(forward: Callable, batches, *, confidence: float = 0.0, steps: int = 100, binary_steps: int = 5,
                initial_const: float = 1e-3, lr: float = 1e-2) -> dict[str, float]:
    """Top-1 on what the C&W L2 attack returns (``top1``) over ``batches`` of {"pixels", "labels"}, and the mean L2
    of its successful perturbations of correctly classified images (``l2``; NaN when there is none)."""
    import math

    import torch

    correct = total = 0
    dists: list[float] = []
    for batch in batches:
        x, y = batch["pixels"], batch["labels"]
        with torch.no_grad():
            clean = forward(x).argmax(-1) == y
        adv, success, l2 = cw_l2(forward, x, y, confidence=confidence, steps=steps, binary_steps=binary_steps,
                                 initial_const=initial_const, lr=lr)
        # Robust: classified correctly and no c found an adversarial example (then the attack returns the input).
        correct += int((clean & ~success).sum())
        dists += l2[success & clean].tolist()
        total += len(y)
    return {"top1": correct / max(1, total), "l2": sum(dists) / len(dists) if dists else math.nan}
