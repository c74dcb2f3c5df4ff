"""Reverse KL — token-level reverse Kullback-Leibler distillation of language models, the "RKL" baseline of
MiniLLM (Gu et al., ICLR 2024, arXiv 2306.08543), DistiLLM (Ko et al., ICML 2024, arXiv 2402.03898) and
TAID (Shing et al., ICLR 2025).

Official code followed: DistiLLM, jongwooko/distillm @ d47e77f, ``distillm/losses.py::reverse_kl`` (the
same function is copied into SakanaAI/TAID @ a062892 ``src/distil_losses/rkl.py``), combined with the LM
loss as in ``finetune.py``: L = (1 - kd_ratio) * CE + kd_ratio * D.

What is implemented:

* Per scored token, KL(q_theta || p) = sum_v q_v (log q_v - log p_v), the *full* divergence (this one the
  reference code does compute with the student's entropy term), with p the teacher's and q the student's
  softmax at temperature 1 (the reference has no temperature), averaged over scored tokens (rows of the
  task's outputs; the lm task flattens them to scored positions). Vocabulary entries whose logit is
  infinite contribute 0 (the reference's ``inf_mask``).
* ``kd_ratio`` 1.0 (pure distillation), the DistiLLM/TAID scripts' setting.

Reverse KL is mode-seeking: the student is pushed onto the teacher's high-probability region and
penalised for mass where the teacher has little.

Deviations: MiniLLM optimises the *sequence-level* reverse KL with a policy gradient over student
samples; this is the token-level version used as the RKL baseline by DistiLLM and TAID (teacher-forced on
the dataset's sequences). The harness's optimiser and budget apply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from bench.api import Method, Params

if TYPE_CHECKING:
    import torch

    from bench.api import Batch, StepContext


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """mean over rows of KL(softmax(z_s) || softmax(z_t)), in float32 (DistiLLM ``reverse_kl``)."""
    import torch
    import torch.nn.functional as F

    s = student_logits.float()
    t = teacher_logits.detach().float()
    q = F.softmax(s, dim=-1)
    log_q = F.log_softmax(s, dim=-1)
    log_p = F.log_softmax(t, dim=-1)
    inf = torch.isinf(s) | torch.isinf(t)
    per_vocab = torch.masked_fill(q * (log_q - log_p), inf, 0.0)
    return per_vocab.sum(-1).mean()


class RKL(Method):
    """Token-level reverse KL(q_student || p_teacher), the RKL baseline of DistiLLM/TAID (MiniLLM-style)."""

    name = "rkl"
    version = "1"
    domains = frozenset({"lm"})

    class Params(Params):
        # kd_ratio 1.0: DistiLLM scripts (--kd-ratio 1.0) and TAID's distil_ratio default for its baselines.
        kd_ratio: float = Field(1.0, ge=0, le=1, description="weight of the divergence; the label loss gets 1 - kd_ratio")


    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        out = ctx.student_outputs(batch)
        teacher = ctx.teacher_outputs(batch)
        d = reverse_kl(out.logits, teacher.logits)
        r = self.params.kd_ratio
        loss = d if r == 1.0 else (1.0 - r) * ctx.label_loss(out, batch) + r * d
        return {"student": loss}
