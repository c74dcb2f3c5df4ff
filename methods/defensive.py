"""Defensive distillation — Papernot, McDaniel, Wu, Jha & Swami, "Distillation as a Defense to Adversarial
Perturbations against Deep Neural Networks" (IEEE S&P 2016, arXiv 1511.04508).

There is no official code (the authors released none). The reference implementation followed is the one
the literature evaluates defensive distillation with: carlini/nn_robust_attacks @ 00be112, ``train_models.py``
(``train_distillation``), written for Carlini & Wagner (IEEE S&P 2017).

What is implemented:

* Generation 0 ("the initial network F"): the student's architecture, freshly initialised, trained on the
  hard labels with the softmax at temperature T: L = CE(y, softmax(z / T)).
* Generation 1 ("the distilled network F^d"): a fresh network of the same architecture trained at the same
  temperature on the soft labels of F at T: L = -sum_c softmax(z_F / T)_c log softmax(z / T)_c, averaged
  over the batch (``softmax_cross_entropy_with_logits(labels=softmax(teacher / T), logits=pred / T)``).
  No label term and no T^2 factor.
* At test time the distilled network is used at T = 1: its raw logits are what the task evaluates and
  what FGSM/PGD attack (``imagenet.robustness=true``), as in the paper and in Carlini & Wagner's
  evaluation. The teacher of this method is thus trained by the method itself; the task's teacher is
  not used (Papernot et al. distil a network of the same architecture).
* T = 100, the temperature of the paper's headline results and of ``train_models.py``'s distilled models.

Budget: the cell's steps are split evenly between the two networks (both are trained for the same
number of epochs in the paper and the reference code). Deviations: the task's optimiser and schedule
(the reference uses SGD 0.01, Nesterov momentum 0.9, 50 epochs); the reference warm-starts both networks
from one epoch of ordinary training (``file_name + "_init"``), here each starts from a fresh
initialisation as the paper describes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from bench.api import Generation, Method, Params, split_steps

if TYPE_CHECKING:
    import torch

    from bench.api import Batch, StepContext, Task


def hard_label_loss(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """CE(y, softmax(z / T)), averaged over the batch (the initial network)."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.float() / temperature, labels)


def soft_label_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """-sum_c softmax(z_t / T)_c log softmax(z / T)_c, averaged over the batch (the distilled network)."""
    import torch.nn.functional as F

    target = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return -(target * F.log_softmax(logits.float() / temperature, dim=-1)).sum(-1).mean()


class Defensive(Method):
    """Papernot et al. 2016: a network trained at temperature T, a fresh one distilled from it at T, used at T = 1."""

    name = "defensive"
    version = "1"
    domains = frozenset({"classification"})
    uses_task_teacher = False

    class Params(Params):
        # T = 100: Papernot et al. 2016 section V (the temperature of the headline adversarial success rates)
        # and carlini/nn_robust_attacks train_models.py (models/*-distilled-100).
        temperature: float = Field(100.0, gt=0, le=1000, description="distillation temperature T of both networks")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.plan: list[int] = []

    def unsupported(self, task: Task) -> str | None:
        if task.problem() != "classification":
            return "defensive distillation trains on class probabilities; this subtask is a regression"
        return None

    def generations(self, total_steps: int) -> list[Generation]:
        self.plan = split_steps(total_steps, 2)
        names = ["initial network F at T", "distilled network F^d at T"]
        return [Generation(s, fresh_student=True, name=names[i]) for i, s in enumerate(self.plan)]

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        t = self.params.temperature
        out = ctx.student_outputs(batch)
        if ctx.generation == 0:
            return {"student": hard_label_loss(out.logits, batch["labels"], t)}
        return {"student": soft_label_loss(out.logits, ctx.previous_outputs(batch).logits, t)}

    def record_info(self) -> dict[str, Any]:
        return {"temperature": self.params.temperature, "evaluated_at_temperature": 1.0,
                "steps_per_network": self.plan,
                "teacher": "the initial network (same architecture as the student), trained at T by this method"}
