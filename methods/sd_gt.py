"""SD-GT — Borup & Andersen, "Even your Teacher Needs Guidance: Ground-Truth Targets Dampen Regularization
Imposed by Self-Distillation" (NeurIPS 2021, arXiv 2102.13088). Official code: Kennethborup/
self_distillation @ cb20d6c, ``self_distiller.py`` (``LitResnet.training_step`` and the step loop).

What is implemented, following the official code:

* Iterated self-distillation with the student's own architecture: ``steps`` training generations, each
  a freshly initialised model (the loop builds a new ``LitResnet`` per step, ``pretrained=False``).
  Generation 0 fits the ground truth; generation t >= 1 is distilled from generation t - 1 (frozen).
* The loss, on probabilities, as the code computes it (``F.mse_loss`` averages over batch x classes):
      L = alpha * mean((softmax(z) - onehot(y))^2) + (1 - alpha) * mean((softmax(z) - softmax(z_prev))^2)
          + reg_coef * sum_theta ||theta||_2
  with alpha the weight of the *ground truth* (the argparse help calls it the distillation weight, but
  the code multiplies the label term by it), and the regulariser summing L2 norms (not squared norms)
  of every trainable parameter. Generation 0 uses the label term alone, unweighted.
* Weight decay 0 in the optimiser: the code uses Adam without weight decay and the explicit norm
  penalty above instead.

Budget: the cell's step budget is split evenly between the generations (the harness re-creates the
optimiser and schedule for each; with fewer steps than generations, one generation per step), so the
row costs the same as every other row. Deviations: the task's optimiser and schedule instead of Adam 1e-3
for 75 epochs per generation at batch 16; the predictions of the previous generation are taken on the same
(unaugmented at the small tier) batches, as the code does on its augmented ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from bench.api import Generation, Method, Params, split_steps

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext, Task


def sd_gt_loss(student_logits: torch.Tensor, labels: torch.Tensor, previous_logits: torch.Tensor | None,
               alpha: float) -> torch.Tensor:
    """alpha * MSE(softmax(z), onehot) + (1 - alpha) * MSE(softmax(z), softmax(z_prev)); MSE = mean over
    batch x classes (``F.mse_loss``). Without previous logits (generation 0): the label MSE alone."""
    import torch.nn.functional as F

    probs = F.softmax(student_logits.float(), dim=-1)
    onehot = F.one_hot(labels, probs.shape[-1]).float()
    label_term = F.mse_loss(probs, onehot)
    if previous_logits is None:
        return label_term
    distil_term = F.mse_loss(probs, F.softmax(previous_logits.detach().float(), dim=-1))
    return alpha * label_term + (1.0 - alpha) * distil_term


def norm_penalty(model: nn.Module, coef: float) -> torch.Tensor:
    """coef * sum over trainable tensors of their L2 norm (``reg_coef * sum(torch.norm(param))``)."""
    return coef * sum(p.norm() for p in model.parameters() if p.requires_grad)


class SDGT(Method):
    """Borup & Andersen 2021: iterated self-distillation from fresh inits, ground truth weighted by alpha, MSE on probabilities."""

    name = "sd_gt"
    version = "1"
    domains = frozenset({"classification"})
    uses_task_teacher = False
    # self_distiller.py: torch.optim.Adam(lr) without weight decay, plus the explicit norm penalty.
    optim_overrides: ClassVar[dict[str, Any]] = {"weight_decay": 0.0}

    class Params(Params):
        # 0.6: the README's example command (the argparse default 1.0 would switch distillation off).
        alpha: float = Field(0.6, ge=0, le=1, description="weight of the ground-truth term (1 - alpha on the "
                                                          "previous generation)")
        # --distillation-steps default 5: generation 0 plus four distilled generations.
        steps: int = Field(5, ge=1, le=100, description="training generations, the first on ground truth only")
        # --reg_coef default 1e-4.
        reg_coef: float = Field(1e-4, ge=0, description="coefficient of the summed parameter L2 norms")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.plan: list[int] = []

    def unsupported(self, task: Task) -> str | None:
        if task.problem() != "classification":
            return "SD-GT's loss is on class probabilities; this subtask is a regression"
        return None

    def generations(self, total_steps: int) -> list[Generation]:
        self.plan = split_steps(total_steps, self.params.steps)
        return [Generation(s, fresh_student=True, name=f"step {i}") for i, s in enumerate(self.plan)]

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        out = ctx.student_outputs(batch)
        previous = ctx.previous_outputs(batch).logits if ctx.generation > 0 else None
        loss = sd_gt_loss(out.logits, batch["labels"], previous, self.params.alpha)
        if self.params.reg_coef:
            loss = loss + norm_penalty(ctx.student, self.params.reg_coef)
        return {"student": loss}

    def record_info(self) -> dict[str, Any]:
        return {"generations": len(self.plan), "steps_per_generation": self.plan, "alpha_ground_truth": self.params.alpha}
