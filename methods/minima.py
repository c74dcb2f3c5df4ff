"""MiniMA — Zhang et al., "Towards the Law of Capacity Gap in Distilling Language Models"
(arXiv 2311.07052; ACL 2025). Official code: GeneZC/MiniMA @ 4842dc0.

What is implemented:

* Teacher choice by the capacity-gap law: the optimal teacher is about 2.5x the student's size
  (paper: the optimal teacher scale grows linearly with the student's, at a near-constant ratio; the
  7B -> 3B MiniMA pair). From the task's declared teacher pool the teacher whose parameter count is
  closest to ``teacher_ratio`` x the student's, in log scale, is chosen. Sizes are total parameter
  counts, as the paper quotes model sizes.
* Student initialisation by structured pruning of that teacher where the model families match
  (``minima/run_sparsification_llama.py``, ``run_converting_llama.py``): gradient importance of heads,
  FFN neurons and hidden dimensions on a small pruning set, keep the top units, then keep the middle
  block of layers. See ``_bert_pruning`` for how the mask gradients are obtained without masks
  (``_lm_pruning`` for Llama-family and GPT-2 causal LMs on the lm domain, where the pruning loss is the
  LM loss, as in MiniMA).
  Where the families differ (or the student is not a sub-shape of the teacher) the student keeps the
  task's initialisation and the record says why.
* Loss (``minima/run_distillation_llama_ds.py``): L = 0.5 * CE(labels) + 0.5 * CE(softmax(z_t),
  softmax(z_s)) at temperature 1, averaged over examples (``soft_cross_entropy``).

Deviations: the pruning set is ``calibration_batches`` training batches of the task (MiniMA uses a
dedicated set of 512-token sequences and the LM loss; here the task's label loss on the teacher
plays that role). After pruning MiniMA distils with AdamW 3e-4, wd 0.1; here the task's optimiser
applies to every method. Regression subtasks use the Gaussian adaptation documented in ``kd``:
the soft cross-entropy becomes half the squared error to the teacher's prediction.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pydantic import Field

from bench.api import Method, Params, TeacherCandidate

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext


def choose_teacher(pool: list[TeacherCandidate], student_params: int, ratio: float) -> TeacherCandidate:
    """The candidate closest to ``ratio`` x the student's size, in log scale (ties: the first)."""
    target = math.log(ratio * student_params)
    return min(pool, key=lambda c: abs(math.log(c.n_params) - target))


def minima_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, label_loss: torch.Tensor,
                lm_weight: float, kd_weight: float, regression: bool = False) -> torch.Tensor:
    """lm_weight * label loss + kd_weight * soft cross-entropy(teacher -> student), temperature 1."""
    import torch.nn.functional as F

    if regression:
        soft = 0.5 * (student_logits.float() - teacher_logits.detach().float()).pow(2).sum(-1).mean()
    else:
        p = F.softmax(teacher_logits.detach().float(), dim=-1)
        soft = -(p * F.log_softmax(student_logits.float(), dim=-1)).sum(-1).mean()
    return lm_weight * label_loss + kd_weight * soft


class MiniMA(Method):
    """Zhang et al.: capacity-gap teacher choice (~2.5x), pruned-teacher initialisation, 0.5 CE + 0.5 soft CE."""

    name = "minima"
    version = "1"
    domains = frozenset({"classification", "lm"})

    class Params(Params):
        # 2.5: the paper's law (optimal teacher ~ 2.5 x student); 0.5/0.5: run_distillation_llama_ds.py
        # line `loss = 0.5 * s_output[0] + 0.5 * soft_cross_entropy(...)`.
        teacher_ratio: float = Field(2.5, gt=1, description="target teacher size / student size")
        lm_weight: float = Field(0.5, ge=0, le=1, description="weight of the label loss")
        kd_weight: float = Field(0.5, ge=0, le=1, description="weight of the soft cross-entropy")
        prune_init: bool = Field(True, description="initialise the student by pruning the teacher")
        calibration_batches: int = Field(8, ge=1, le=1000, description="batches in the pruning set")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.info: dict[str, Any] = {}

    def select_teacher(self, pool: list[TeacherCandidate], student_params: int) -> str | None:
        chosen = choose_teacher(pool, student_params, self.params.teacher_ratio)
        self.info["teacher"] = {
            "chosen": chosen.name, "teacher_params": chosen.n_params, "student_params": student_params,
            "ratio": chosen.n_params / student_params, "target_ratio": self.params.teacher_ratio,
            "pool": {c.name: c.n_params for c in pool},
        }
        return chosen.name

    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        from bench.methods import _bert_pruning as bp
        from bench.methods import _lm_pruning as lp

        if not self.params.prune_init:
            self.info["init"] = "task default (prune_init=false)"
            return student
        # Causal LMs (Llama family, GPT-2) are pruned by _lm_pruning, BERT encoders by _bert_pruning.
        pruner = lp if lp.lm_dims(teacher) is not None else bp
        reason = pruner.why_not_prunable(teacher, student)
        if reason is not None:
            self.info["init"] = f"task default: cannot prune the teacher into the student ({reason})"
            return student

        def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
            return ctx.label_loss(ctx.task.forward(model, batch), batch)

        batches = ctx.calibration_batches(self.params.calibration_batches)
        scores = pruner.importance(teacher, batches, loss_fn)
        student.load_state_dict(pruner.pruned_state_dict(teacher, student, scores), strict=True)
        if pruner is lp:
            # The importance estimate runs the teacher (forward + backward) on these batches: teacher work
            # outside the distillation loop, stated here (training.teacher_forward_passes counts the loop).
            self.info["init"] = lp.describe(teacher, student)
            self.info["importance_batches"] = len(batches)
            return student
        t, s = bp.bert_dims(teacher), bp.bert_dims(student)
        self.info["init"] = (f"pruned from the teacher: layers {bp.middle_layers(t['layers'], s['layers'])} of "
                             f"{t['layers']}, hidden {s['hidden']}/{t['hidden']}, heads {s['heads']}/{t['heads']}, "
                             f"ffn {s['ffn']}/{t['ffn']}")
        return student

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        out = ctx.student_outputs(batch)
        teacher = ctx.teacher_outputs(batch)
        loss = minima_loss(out.logits, teacher.logits, ctx.label_loss(out, batch), self.params.lm_weight,
                           self.params.kd_weight, regression=ctx.problem() == "regression")
        return {"student": loss}

    def state_dict(self) -> dict[str, Any]:
        return {"info": self.info}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.info = dict(state["info"])

    def record_info(self) -> dict[str, Any]:
        return dict(self.info)
