"""TAID — Temporally Adaptive Interpolated Distillation (Shing et al., ICLR 2025, arXiv 2501.16937).

Official code: SakanaAI/TAID @ a062892, ``src/distil_losses/taid.py`` (loss and t schedule),
``src/distil_losses/fkl.py`` (the forward-KL-as-cross-entropy it calls), ``src/loss.py`` (mixing with the
label loss).

What is implemented, following the official code:

* Target: the interpolation happens in *logit* space between the stop-gradient student and the
  teacher, p_t = softmax((1 - t) * sg(z_s) + t * z_t).
* Loss: forward KL from p_t to the student, computed as the cross-entropy -sum_v p_t log q_theta
  (same gradient; the entropy of the constant target is left out, exactly as ``fkl.py`` does). It is
  averaged over examples -- over scored tokens on the lm domain, whose task flattens outputs to one row
  per token (the masked token mean of ``src/loss.py``). Total L = (1 - r) * label loss + r * J(t) with
  ``distil_ratio`` r = 1.
* Schedule (``update_t``), run once per *training* step after the loss of that step:
  on the first call only ``prev_loss`` is recorded; afterwards
  delta = (prev - loss) / (prev + 1e-15), m <- beta m + (1 - beta) delta,
  t_lin = t_start + (t_end - t_start) * n / N (n = optimiser steps completed before this one,
  N = the cell's step budget), t <- min(t_end, max(t_lin, t + alpha * sigmoid(m) * (1 - t))),
  or t <- t_lin when ``adaptive`` is false; then prev <- loss.

Classification (GLUE, ImageNet/CIFAR-10): the paper's experiments and the released code are language-model
distillation only (instruction tuning of LMs); there is no classification setting to follow. On those
tasks the defaults are the language-model ones above, unchanged (t_start 0.4, alpha 5e-4, beta 0.99,
r = 1), over the class logits; the row's footnote says so (``table_notes``).

Deviations, on purpose:

* The official code also updates t on validation batches (``update_t`` is called in ``forward``
  without checking the training mode). Here t moves on training steps only, as the paper describes.
* The optimiser and schedule are the task's (the harness keeps them equal across methods), not the
  paper's AdamW 1e-4 cosine, which is an instruction-tuning recipe for billion-parameter LMs.
* Regression subtasks (STS-B): outputs are treated as means of unit-variance Gaussians. Interpolating
  the natural parameters — the logit-space analogue — gives the target mean
  (1 - t) sg(z_s) + t z_t, and the cross-entropy to it is, up to a constant, half the squared error.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from bench.api import Method, Params

if TYPE_CHECKING:
    import torch

    from bench.api import Batch, StepContext, Task


def taid_target(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """p_t = softmax((1 - t) sg(z_s) + t z_t), in float32."""
    import torch.nn.functional as F

    mixed = (1.0 - t) * student_logits.detach().float() + t * teacher_logits.detach().float()
    return F.softmax(mixed, dim=-1)


def taid_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float,
              regression: bool = False) -> torch.Tensor:
    """J(t): cross-entropy from the interpolated target to the student, averaged over examples."""
    import torch.nn.functional as F

    if regression:
        target = (1.0 - t) * student_logits.detach().float() + t * teacher_logits.detach().float()
        return 0.5 * (student_logits.float() - target).pow(2).sum(-1).mean()
    p_t = taid_target(student_logits, teacher_logits, t)
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    return -(p_t * log_q).sum(-1).mean()


class TAIDSchedule:
    """The adaptive interpolation parameter t with momentum and a linear floor (``update_t``)."""

    def __init__(self, t_start: float, t_end: float, alpha: float, beta: float, adaptive: bool = True) -> None:
        self.t_start, self.t_end, self.alpha, self.beta, self.adaptive = t_start, t_end, alpha, beta, adaptive
        self.t = t_start
        self.momentum = 0.0
        self.prev_loss = math.inf

    def update(self, loss: float, step: int, total_steps: int) -> float | None:
        """Advance t after a training step whose loss was ``loss``; returns the proposed delta_t."""
        if math.isinf(self.prev_loss):
            self.prev_loss = loss
            return None
        relative = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1.0 - self.beta) * relative
        delta_t = self.alpha * (1.0 / (1.0 + math.exp(-self.momentum))) * (1.0 - self.t)
        t_lin = self.t_start + (self.t_end - self.t_start) * step / total_steps
        self.t = t_lin if not self.adaptive else min(self.t_end, max(t_lin, self.t + delta_t))
        self.prev_loss = loss
        return delta_t

    def state_dict(self) -> dict[str, float]:
        return {"t": self.t, "momentum": self.momentum, "prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.t, self.momentum, self.prev_loss = state["t"], state["momentum"], state["prev_loss"]


class TAID(Method):
    """Shing et al. (ICLR 2025): logit interpolation of sg(student) and teacher, forward KL, adaptive t."""

    name = "taid"
    version = "1"
    domains = frozenset({"classification", "lm"})

    class Params(Params):
        # Defaults and bounds: SakanaAI/TAID src/distil_losses/taid.py (constructor and its asserts)
        # and src/loss.py (distil_ratio 1.0). t_start 0.4 is the argparse default and the Phi-3 pair;
        # the Llama-2 and StableLM scripts use 0.2.
        t_start: float = Field(0.4, ge=0, lt=1, description="initial interpolation t")
        t_end: float = Field(1.0, gt=0, le=1, description="final interpolation t")
        alpha: float = Field(5e-4, ge=0, le=1, description="learning rate of t")
        beta: float = Field(0.99, ge=0, le=1, description="momentum of the relative loss change")
        adaptive: bool = Field(True, description="false: t follows the linear ramp only")
        distil_ratio: float = Field(1.0, ge=0, le=1, description="weight r of J(t); the label loss gets 1 - r")

        @model_validator(mode="after")
        def _ordered(self) -> "TAID.Params":
            if self.t_start >= self.t_end:
                raise ValueError(f"t_start ({self.t_start}) must be below t_end ({self.t_end})")
            return self

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        p = self.params
        self.schedule = TAIDSchedule(p.t_start, p.t_end, p.alpha, p.beta, p.adaptive)
        self._last: tuple[float, int] | None = None

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        out = ctx.student_outputs(batch)
        teacher = ctx.teacher_outputs(batch)
        j = taid_loss(out.logits, teacher.logits, self.schedule.t, regression=ctx.problem() == "regression")
        self._last = (float(j.detach()), ctx.step)
        r = self.params.distil_ratio
        loss = r * j if r == 1.0 else (1.0 - r) * ctx.label_loss(out, batch) + r * j
        return {"student": loss}

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        if self._last is not None:
            loss, step = self._last
            self.schedule.update(loss, step, ctx.total_steps)
            self._last = None
        return {"taid_t": self.schedule.t}

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])

    def record_info(self) -> dict[str, Any]:
        return {"final_t": self.schedule.t, "final_momentum": self.schedule.momentum}

    def table_notes(self, task: Task) -> list[str]:
        if getattr(task, "domain", None) != "classification":
            return []
        return ["TAID's paper and code distil language models only and give no classification setting; on "
                "this task its language-model defaults are used unchanged (t_start 0.4, alpha 5e-4, beta 0.99)"]
