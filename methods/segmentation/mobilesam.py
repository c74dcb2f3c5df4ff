"""MobileSAM — Zhang, Han, Qiao, Kim, Bae, Lee & Hong, "Faster Segment Anything: Towards Lightweight SAM for
Mobile Applications" (arXiv 2306.14289, 2023). Official code: ChaoningZhang/MobileSAM (``mobile_sam/``: the
TinyViT-5M encoder and SAM's prompt encoder / mask decoder; the repository has no training code — its README:
"trained on a single GPU with 100k datasets (1% of the original images) ... The training code will be
available soon"), so the recipe below follows the paper.

What is implemented (paper §3, "decoupled distillation"):

* The student keeps SAM's prompt encoder and mask decoder unchanged: ``init_student`` copies the teacher's
  ``prompt_encoder`` and ``mask_decoder`` weights into the student and freezes them (``requires_grad``
  False). Only the image encoder trains.
* Loss: the mean squared error between the student's image embedding and the teacher's,
  ``MSE(E_S(I), E_T(I))`` averaged over all B x C x S/16 x S/16 elements; no mask, prompt or label enters
  (the paper's point: distilling the encoder alone, decoupled from the decoder, is easier to optimise than the
  coupled focal + dice training and needs no prompts).
* Optional mask-decoder fine-tuning (paper §3.2: "we can finetune the mask decoder ... optional", not needed
  for the released model): with ``finetune_decoder`` the last ``finetune_fraction`` of the cell's steps is a
  second generation in which the encoder is frozen and the mask decoder trains on the task's supervised SAM
  loss (``Task.label_loss``: focal 20 + dice 1 on the best of the output masks, plus the IoU-head loss).

Checked up front: the student's image embedding must have the teacher's shape (C, S/16, S/16), since the
loss compares them element-wise and the teacher's decoder reads it; otherwise ``init_student`` raises
`bench.BenchError` naming both shapes.

Deviations: no SA-1B — the training images are the task's (see its tier notes); the teacher's embeddings
are recomputed at every step (``ctx.run_teacher``) instead of being pre-computed once as the paper does,
which changes the cost, not the loss; the optimiser, schedule, batch size and step budget are the task's
(the paper: 8 epochs on 1 % of SA-1B); the fine-tuning share (``finetune_fraction``) is not given in the
paper and is this harness's choice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from bench import BenchError
from bench.api import Generation, Method, Params

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext

#: The parts of a SAM model that form its prompt-side decoder (``segment_anything.Sam`` attribute names).
DECODER_PARTS = ("prompt_encoder", "mask_decoder")


def _device(model: nn.Module) -> Any:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else "cpu"


def embedding_shape(model: nn.Module) -> tuple[int, ...]:
    """(C, h, w) of ``model.embed`` on one blank image at ``model.img_size`` (eval mode, no gradients, so
    batch-norm statistics and the random stream are untouched)."""
    import torch

    size = int(model.img_size)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.embed(torch.zeros(1, 3, size, size, device=_device(model)))
    finally:
        model.train(was)
    return tuple(out.shape[1:])


def check_embeddings(teacher: nn.Module, student: nn.Module, method: str) -> tuple[int, ...]:
    """The common (C, h, w); raises `BenchError` when the student's embedding differs from the teacher's."""
    for who, m in (("teacher", teacher), ("student", student)):
        missing = [a for a in ("embed", "img_size", *DECODER_PARTS) if not hasattr(m, a)]
        if missing:
            raise BenchError(f"{method}: the {who} is not a promptable SAM model (no {', '.join(missing)}); "
                             f"{method} needs the sam task's PromptableSAM models")
    if int(teacher.img_size) != int(student.img_size):
        raise BenchError(f"{method}: teacher input size {teacher.img_size} != student input size "
                         f"{student.img_size}; both must read the same {teacher.img_size} px images")
    t, s = embedding_shape(teacher), embedding_shape(student)
    if t != s:
        raise BenchError(f"{method}: the student's image embedding has shape (C, h, w) = {s}, the teacher's {t}; "
                         f"{method} regresses the teacher's embedding element-wise and reuses its decoder, so the "
                         f"student encoder must output {t} (set the student's embed_dim to {t[0]})")
    return t


def copy_decoder(teacher: nn.Module, student: nn.Module, trainable: bool, method: str) -> None:
    """Load the teacher's prompt encoder and mask decoder into the student (strict), trainable or frozen."""
    for part in DECODER_PARTS:
        src, dst = getattr(teacher, part), getattr(student, part)
        try:
            dst.load_state_dict(src.state_dict(), strict=True)
        except RuntimeError as exc:
            raise BenchError(f"{method}: the student's {part} differs from the teacher's, so the teacher's cannot "
                             f"be copied into it; give the student the teacher's decoder configuration "
                             f"(decoder_depth, decoder_heads, decoder_mlp_dim, embed_dim) — {exc}") from exc
        for p in dst.parameters():
            p.requires_grad_(trainable)


def embedding_mse(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element (MobileSAM's decoupled-distillation loss)."""
    import torch.nn.functional as F

    return F.mse_loss(student_emb.float(), teacher_emb.detach().float())


class MobileSAM(Method):
    """Zhang et al. 2023: decoupled distillation — the student encoder regresses the teacher's image embedding (MSE), SAM's decoder reused frozen."""

    name = "mobilesam"
    version = "1"
    domains = frozenset({"segmentation"})

    class Params(Params):
        # Paper §3.2: fine-tuning the mask decoder after distillation is optional; the released MobileSAM
        # keeps SAM's decoder, so it is off.
        finetune_decoder: bool = Field(False, description="after distilling the encoder, fine-tune the mask "
                                                          "decoder on the task's SAM loss (encoder frozen)")
        # Not in the paper (it gives no fine-tuning schedule): this harness's share of the step budget.
        finetune_fraction: float = Field(0.1, gt=0, lt=1, description="share of the steps spent fine-tuning the "
                                                                       "decoder when finetune_decoder is set")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.info: dict[str, Any] = {}

    def generations(self, total_steps: int) -> list[Generation]:
        if not self.params.finetune_decoder or total_steps < 2:
            return [Generation(total_steps, fresh_student=False, name="decoupled distillation")]
        tune = min(total_steps - 1, max(1, round(self.params.finetune_fraction * total_steps)))
        return [Generation(total_steps - tune, fresh_student=False, name="decoupled distillation"),
                Generation(tune, fresh_student=False, name="mask decoder fine-tuning")]

    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        if teacher is None:
            raise BenchError("mobilesam needs the task's teacher (the cell has none)")
        shape = check_embeddings(teacher, student, self.name)
        copy_decoder(teacher, student, trainable=False, method=self.name)
        self.info.update(embedding_shape=list(shape), decoder="copied from the teacher, frozen",
                         finetune_decoder=self.params.finetune_decoder)
        return student

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        if ctx.generation > 0:  # optional decoder fine-tuning on the task's supervised SAM loss
            return {"student": ctx.label_loss(ctx.student_outputs(batch), batch)}
        images = batch["image"]
        target = ctx.run_teacher(lambda t: t.embed(images), n_examples=int(images.shape[0]))
        loss = embedding_mse(ctx.student.embed(images), target)
        self._last = {"embedding_mse": float(loss.detach())}
        return {"student": loss}

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        # The fine-tuning generation's optimiser is built from the parameters that require gradients when it
        # starts (the step after this one): switch encoder -> decoder at the last distillation step.
        if (self.params.finetune_decoder and ctx.generation == 0 and ctx.generation_steps < ctx.total_steps
                and ctx.generation_step + 1 == ctx.generation_steps):
            for p in ctx.student.image_encoder.parameters():
                p.requires_grad_(False)
            for p in ctx.student.mask_decoder.parameters():
                p.requires_grad_(True)
            self.info["decoder"] = "copied from the teacher, frozen during distillation, then fine-tuned"
        return dict(getattr(self, "_last", {})) if ctx.generation == 0 else {}

    def state_dict(self) -> dict[str, Any]:
        return {"info": dict(self.info)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.info = dict(state["info"])

    def record_info(self) -> dict[str, Any]:
        return dict(self.info)
