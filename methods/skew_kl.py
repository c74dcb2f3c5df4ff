"""Skew KL — the skew Kullback-Leibler divergences of DistiLLM (Ko et al., "DistiLLM: Towards Streamlined
Distillation for Large Language Models", ICML 2024, arXiv 2402.03898).

Official code: jongwooko/distillm @ d47e77f, ``distillm/losses.py::skewed_forward_kl`` and
``skewed_reverse_kl`` (also SakanaAI/TAID @ a062892 ``src/distil_losses/skew_fkl.py``/``skew_rkl.py``),
``--skew-alpha`` default 0.1 (``arguments.py``), mixed with the LM loss as in ``finetune.py``:
L = (1 - kd_ratio) * CE + kd_ratio * D, with ``--kd-ratio 1.0`` in ``scripts/gpt2/distillm/*.sh``.

What is implemented, per scored token (averaged over scored tokens; p teacher, q student, temperature 1):

* forward (SKL, DistiLLM's default ``sfkl``): the reference computes the cross-entropy
  -sum_v p_v log(a p_v + (1 - a) q_v), i.e. the skew KL KL(p || a p + (1 - a) q) without the teacher's
  entropy term (same gradient); the value returned here is exactly that reference quantity.
* reverse (SRKL, ``srkl``): KL(q || (1 - a) p + a q) = sum_v q_v (log q_v - log((1 - a) p_v + a q_v)), the
  full divergence as in the reference.
* Entries with infinite logits contribute 0 (the reference's ``inf_mask``).

The skew keeps the divergence finite and its gradient bounded where one distribution has (near) zero mass
(the paper's Theorem 1 and section 3.1).

Deviations: DistiLLM's *adaptive off-policy* student-generated outputs (a replay buffer of student samples
used with a probability raised when the validation loss stalls, ``finetune.py``) are not implemented; the
student is trained on the dataset's sequences only, as DistiLLM's ablation "SKL without SGO". The
harness's optimiser and budget apply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from bench.api import Method, Params

if TYPE_CHECKING:
    import torch

    from bench.api import Batch, StepContext


def skew_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """mean over rows of -sum p log(alpha p + (1 - alpha) q) (DistiLLM ``skewed_forward_kl``)."""
    import torch
    import torch.nn.functional as F

    s = student_logits.float()
    t = teacher_logits.detach().float()
    p = F.softmax(t, dim=-1)
    q = F.softmax(s, dim=-1)
    log_mix = torch.log(alpha * p + (1.0 - alpha) * q)
    inf = torch.isinf(s) | torch.isinf(t)
    return -torch.masked_fill(p * log_mix, inf, 0.0).sum(-1).mean()


def skew_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """mean over rows of KL(q || (1 - alpha) p + alpha q) (DistiLLM ``skewed_reverse_kl``)."""
    import torch
    import torch.nn.functional as F

    s = student_logits.float()
    t = teacher_logits.detach().float()
    p = F.softmax(t, dim=-1)
    q = F.softmax(s, dim=-1)
    log_q = F.log_softmax(s, dim=-1)
    log_mix = torch.log((1.0 - alpha) * p + alpha * q)
    inf = torch.isinf(s) | torch.isinf(t)
    return torch.masked_fill(q * (log_q - log_mix), inf, 0.0).sum(-1).mean()


class SkewKL(Method):
    """DistiLLM (Ko et al. 2024): skew forward KL(p || a p + (1-a) q) (or skew reverse KL), a = 0.1."""

    name = "skew_kl"
    version = "1"
    domains = frozenset({"lm"})

    class Params(Params):
        # distillm arguments.py: --skew-alpha default 0.1; scripts/gpt2/distillm/*.sh: --type adaptive-sfkl
        # (the forward skew) and --kd-ratio 1.0.
        alpha: float = Field(0.1, gt=0, lt=1, description="skew a: weight of the teacher (forward) / student "
                                                         "(reverse) in the mixture")
        direction: Literal["forward", "reverse"] = Field("forward", description="SKL (forward) or SRKL (reverse)")
        kd_ratio: float = Field(1.0, ge=0, le=1, description="weight of the divergence; the label loss gets 1 - kd_ratio")


    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        out = ctx.student_outputs(batch)
        teacher = ctx.teacher_outputs(batch)
        fn = skew_forward_kl if self.params.direction == "forward" else skew_reverse_kl
        d = fn(out.logits, teacher.logits, self.params.alpha)
        r = self.params.kd_ratio
        loss = d if r == 1.0 else (1.0 - r) * ctx.label_loss(out, batch) + r * d
        return {"student": loss}
