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

Defaults depend on the task's domain, because the literature's KD baselines differ by domain; a value
given in the suite always wins, and the values used are recorded (``method_info``):

* classification: T = 4, alpha = 0.9 (the CRD/torchdistill benchmark settings, see ``Params``);
* lm (token-level KD of causal LMs): T = 1, alpha = 1, i.e. pure forward KL, the "KD" baseline of the
  LLM-distillation repositories: DistiLLM (jongwooko/distillm @ d47e77f, ``scripts/gpt2/kd/kd_base.sh``:
  ``--type kd --kd-ratio 1.0``; ``distillm/losses.py::forward_kl`` has no temperature) and TAID
  (SakanaAI/TAID @ a062892, ``scripts/*/fkl.sh`` with ``distil_ratio`` 1.0 and ``src/distil_losses/fkl.py``).
  Their logged loss is the cross-entropy -sum p log q (no teacher entropy); the value here is the KL,
  with the same gradient. The lm task's outputs are one row per scored token, so the ``batchmean`` KL is
  the token average those repositories compute.

* grounding (a frame encoder of the charades_sta task): feature distillation, the baseline ResidualViT's
  setting implies (a smaller frame encoder taught by the foundation model's frame embeddings): the student's
  normalised frame features regress the teacher's, ``L = (1 - alpha) * label + alpha * D``, with ``D`` the mean
  cosine distance ``1 - cos(z_s, z_t)`` over frames (``feature_loss: cosine``, the default) or the mean squared
  distance between the normalised features (``mse``); alpha = 1 (no label term) unless the suite sets it. The
  temperature does not apply. The text encoder is the task's (the teacher's, frozen, in the student too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from bench.api import Method, Params

#: (temperature, alpha) per task domain when the suite leaves them unset (sources in the module docstring).
DOMAIN_DEFAULTS = {"classification": (4.0, 0.9), "lm": (1.0, 1.0), "grounding": (1.0, 1.0)}

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


def feature_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean over frames of ``1 - cos`` (``cosine``) or of the squared distance (``mse``) of normalised features."""
    import torch.nn.functional as F

    s, t = F.normalize(student.float(), dim=-1), F.normalize(teacher.detach().float(), dim=-1)
    if kind == "cosine":
        return (1.0 - (s * t).sum(-1)).mean()
    return ((s - t) ** 2).sum(-1).mean()


class KD(Method):
    """Hinton et al. 2015: temperature-softened KL x T^2 mixed with the label loss."""

    name = "kd"
    version = "1"
    domains = frozenset({"classification", "lm", "grounding"})

    class Params(Params):
        # Unset (None) means the task domain's default, DOMAIN_DEFAULTS:
        # classification T = 4 and alpha = 0.9 are the KD baseline settings of the CRD/torchdistill
        # classification benchmarks (Tian et al. 2020, RepDistiller `train_student.py` default --kd_T 4, and
        # the README's KD command `-r 0.1 -a 0.9 -b 0`: 0.1 on the label CE, 0.9 on the KD term); Hinton et al.
        # recommend a "considerably lower weight" on the hard-label term. lm T = 1, alpha = 1: DistiLLM
        # kd_base.sh (--type kd --kd-ratio 1.0) and TAID fkl.sh (distil_ratio 1.0), see the module docstring.
        temperature: float | None = Field(None, gt=0, description="softmax temperature T (unset: classification 4, "
                                                                  "lm 1)")
        alpha: float | None = Field(None, ge=0, le=1, description="weight of the soft (distillation) term (unset: "
                                                                  "classification 0.9, lm 1)")

        # grounding only (module docstring): cosine distance, or squared distance, of normalised frame features
        feature_loss: Literal["cosine", "mse"] = Field("cosine", description="grounding: frame-feature distance "
                                                                            "to the teacher's")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.resolved: dict[str, object] = {}

    @classmethod
    def check_task(cls, params: Params, task: str, task_params: Params) -> str | None:
        from bench import registry

        if params.temperature is not None and registry.tasks.get(task).domain == "grounding":
            return (f"kd.temperature does not apply to {task} (grounding: kd regresses frame features, no softmax); "
                    f"leave it unset there")
        return None

    def resolve(self, domain: str) -> tuple[float, float]:
        """(temperature, alpha) for a task of ``domain``: the suite's values, else the domain's defaults."""
        t0, a0 = DOMAIN_DEFAULTS.get(domain, DOMAIN_DEFAULTS["classification"])
        t = self.params.temperature if self.params.temperature is not None else t0
        a = self.params.alpha if self.params.alpha is not None else a0
        used = ("alpha",) if domain == "grounding" else ("temperature", "alpha")  # no softmax on grounding
        self.resolved = {"temperature": t, "alpha": a, "domain": domain,
                         "defaults_used": [k for k in used if getattr(self.params, k) is None]}
        return t, a

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        out = ctx.student_outputs(batch)
        teacher = ctx.teacher_outputs(batch)
        label = ctx.label_loss(out, batch)
        temperature, alpha = self.resolve(ctx.task.domain)
        if ctx.task.domain == "grounding":
            self.resolved.pop("temperature", None)
            self.resolved["feature_loss"] = self.params.feature_loss
            soft = feature_distance(out.logits, teacher.logits, self.params.feature_loss)
            return {"student": (1.0 - alpha) * label + alpha * soft if alpha < 1 else soft}
        loss, _ = kd_loss(out.logits, teacher.logits, label, temperature, alpha,
                          regression=ctx.problem() == "regression")
        return {"student": loss}

    def record_info(self) -> dict[str, object]:
        return dict(self.resolved)
