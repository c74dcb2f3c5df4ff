"""Hinton et al. 2015, "Distilling the Knowledge in a Neural Network" (arXiv 1503.02531).

Classic knowledge distillation: the student matches the teacher's temperature-softened distribution,
mixed with the ordinary label loss,

    L = (1 - alpha) * CE(y, softmax(z_s)) + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)).

The T^2 factor keeps the soft-target gradients' magnitude independent of T (paper, section 2). The
paper has no official code release; the reference implementation followed is the one the CRD
benchmark uses (HobbitLong/RepDistiller, ``distiller_zoo/KD.py``: KL summed over classes, divided by
the batch size, times T^2), which torchdistill's ``KDLoss`` matches.

Regression subtasks (e.g. STS-B): a softmax over one output is undefined, so the documented adaptation
treats each output as the mean of a Gaussian with standard deviation T. Then
KL(N(z_t, T^2) || N(z_s, T^2)) = (z_t - z_s)^2 / (2 T^2), and with the T^2 factor the soft term is
(z_t - z_s)^2 / 2: squared-error matching of the teacher's prediction, as in TinyBERT's and
DistilBERT's regression heads. The label term is the task's own regression loss (MSE).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from bench.api import Method, Params

if TYPE_CHECKING:
    import torch

    from bench.api import Batch, StepContext


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, label_loss: torch.Tensor,
            temperature: float, alpha: float, regression: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (total loss, soft term) for one batch; see the module docstring for the formula."""
    import torch.nn.functional as F

    t = temperature
    teacher_logits = teacher_logits.detach()
    if regression:
        soft = 0.5 * (student_logits.float() - teacher_logits.float()).pow(2).sum(-1).mean()
    else:
        log_q = F.log_softmax(student_logits.float() / t, dim=-1)
        p = F.softmax(teacher_logits.float() / t, dim=-1)
        soft = F.kl_div(log_q, p, reduction="batchmean") * t * t
    return (1.0 - alpha) * label_loss + alpha * soft, soft


class KD(Method):
    """Hinton et al. 2015: temperature-softened KL x T^2 mixed with the label loss."""

    name = "kd"
    version = "1"
    domains = frozenset({"classification"})

    class Params(Params):
        # T = 4 and alpha = 0.9 are the KD baseline settings of the CRD/torchdistill classification
        # benchmarks (Tian et al. 2020, RepDistiller `train_student.py` default --kd_T 4, and the README's
        # KD command `-r 0.1 -a 0.9 -b 0`: 0.1 on the label CE, 0.9 on the KD term);
        # Hinton et al. recommend a "considerably lower weight" on the hard-label term.
        temperature: float = Field(4.0, gt=0, description="softmax temperature T")
        alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft (distillation) term")

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        out = ctx.student_outputs(batch)
        teacher = ctx.teacher_outputs(batch)
        label = ctx.label_loss(out, batch)
        loss, _ = kd_loss(out.logits, teacher.logits, label, self.params.temperature, self.params.alpha,
                          regression=ctx.problem() == "regression")
        return {"student": loss}
