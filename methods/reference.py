"""Reference rows: the teacher itself, and the student trained on labels only under the same budget.

Every leaderboard needs both: the teacher bounds what distillation can recover, and the label-only
student is the baseline a distillation method has to beat for its row to mean anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.api import Method, Params

if TYPE_CHECKING:
    import torch

    from bench.api import Batch, StepContext


class Teacher(Method):
    """The task's default teacher, evaluated and measured as is (no training in the cell)."""

    name = "teacher"
    domains = frozenset({"classification", "lm", "diffusion", "segmentation", "grounding"})
    Params = Params
    role = "teacher"

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        raise RuntimeError("the teacher row does not train")


class Student(Method):
    """The task's student trained on ground-truth labels only (no teacher), same budget as every method."""

    name = "student"
    domains = frozenset({"classification", "lm", "diffusion", "segmentation", "grounding"})
    Params = Params
    role = "student"

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        out = ctx.student_outputs(batch)
        return {"student": ctx.label_loss(out, batch)}
