"""DMAE — Bai, Wang, Xie et al., "Masked Autoencoders Enable Efficient Knowledge Distillers" (CVPR 2023,
arXiv 2208.12256). Official code: UCSC-VLAA/DMAE @ a0f4959, ``models_mae_distill.py`` (model and losses),
``engine_distill.py`` (the step), ``main_distill.py`` (arguments) and ``pretrain.sh`` (the recipe).

What is implemented, following the official code:

* Masking (``random_masking_customized``): per example, patches are ranked by uniform noise and the first
  ``int(L * (1 - mask_ratio))`` kept; ratio 0.75. Teacher and student see the *same* visible patches
  (the teacher draws ``ids_keep``, the student encodes ``forward_encoder_student(imgs, ids_keep)``).
* Student: the task's ViT encodes the class token and the visible patches only (patch embedding plus its
  position embedding, gathered); an MAE decoder (decoder embedding, mask tokens, fixed 2-D sin-cos
  positions, ``decoder_depth`` blocks of width ``decoder_dim``, pixel prediction) reconstructs every patch.
* Pixel loss (``forward_loss``, ``norm_pix_loss`` unset in pretrain.sh, target ``original_img``): mean
  over each patch's p*p*3 values of the squared error to the input image (as the model receives it, i.e.
  normalised), averaged over the *masked* patches only.
* Feature loss (``forward_distillation_loss_embedding`` with ``fc-1layer`` and ``L1``): the output of
  student block ``student_block`` (before the final norm; class token and visible tokens) is projected
  linearly to the teacher's width and compared with the output of teacher block ``teacher_block`` on the
  same tokens: ``L1Loss(normalize(F_T), normalize(P(F_S)))`` with L2 normalisation over channels, averaged
  over all elements. The teacher is frozen, in eval mode, without gradients, and encodes only the
  visible tokens; it runs only up to its aligned block (the loss is identical; the official code runs the
  whole teacher and its decoder, whose prediction is unused with this target).
* Total pre-training loss: pixel loss + feature loss, equal weights (engine_distill.py adds them).
* Aligned blocks: 8 of 12 (ViT-B student) and 17 of 24 (ViT-L teacher) in pretrain.sh, both at three
  quarters of the depth; by default the block at ``ceil(0.75 * depth) - 1`` is taken, which gives exactly
  8 and 17 for those depths.

Two phases, as the paper's recipe (100 epochs of distillation pre-training, then 100 of fine-tuning):
generation 0 pre-trains with the losses above for ``pretrain_fraction`` of the cell's steps; generation
1 fine-tunes the same student (not re-initialised) on the task's labels with new optimiser and schedule.

Deviations: the teacher is the task's trained classifier, not an MAE-pre-trained (un-fine-tuned) ViT-L;
the student keeps its own (timm, learned) position embeddings instead of MAE's fixed sin-cos ones; the
fine-tuning phase uses the task's label loss without mixup/cutmix/label smoothing/layer decay; the
optimiser and schedule are the task's (the reference: AdamW, blr 1.5e-4 x 4096/256, weight decay 0.05,
20 warm-up epochs). Needs ViT student and teacher (timm ``VisionTransformer`` with a class token and no
register tokens) with the same patch grid; otherwise the cell is skipped with the reason.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pydantic import Field

from bench.api import Generation, Method, Params

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bench.api import Batch, StepContext, Task


def aligned_block(depth: int, requested: int | None) -> int:
    """``requested``, or the block at three quarters of the depth: ceil(0.75 depth) - 1 (8 of 12, 17 of 24)."""
    return requested if requested is not None else math.ceil(0.75 * depth) - 1


def random_masking(batch: int, length: int, ratio: float, device: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids_keep [B, keep], ids_restore [B, L], mask [B, L] with 1 = masked), as ``random_masking_customized``."""
    import torch

    keep = int(length * (1 - ratio))
    noise = torch.rand(batch, length, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, length, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], ids_restore, torch.gather(mask, 1, ids_restore)


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, L, p*p*3], patches in row-major order, pixels (row, column, channel) inside."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def masked_pixel_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-patch mean squared error, averaged over the masked patches (``forward_loss``)."""
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def feature_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, proj: nn.Module) -> torch.Tensor:
    """L1 between the L2-normalised teacher features and the L2-normalised projected student features, mean
    over all elements (``nn.L1Loss()`` of ``F.normalize(., dim=-1)``)."""
    import torch.nn.functional as F

    return F.l1_loss(F.normalize(proj(student_features), dim=-1), F.normalize(teacher_features.detach(), dim=-1))


def encode_visible(vit: nn.Module, images: torch.Tensor, ids_keep: torch.Tensor, upto: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run a timm ViT on the class token + the visible patches (``forward_encoder_student``).

    Returns (outputs of every block run, final normed tokens); with ``upto`` the blocks stop after block
    ``upto`` and the second value is that block's output."""
    import torch

    x = vit.patch_embed(images)
    if x.dim() == 4:  # NHWC patch grids (some timm versions/configs)
        x = x.flatten(1, 2)
    x = x + vit.pos_embed[:, vit.num_prefix_tokens:]
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = vit.norm_pre(vit.pos_drop(torch.cat([cls, x], dim=1)))
    outs = []
    for i, blk in enumerate(vit.blocks):
        x = blk(x)
        outs.append(x)
        if upto is not None and i == upto:
            return outs, x
    return outs, vit.norm(x)


def why_not_vit(vit: nn.Module) -> str | None:
    if not all(hasattr(vit, a) for a in ("patch_embed", "blocks", "pos_embed", "cls_token", "norm")):
        return "not a timm VisionTransformer"
    if vit.cls_token is None or getattr(vit, "no_embed_class", False) or getattr(vit, "reg_token", None) is not None:
        return "DMAE's encoder needs a class token with its own position embedding and no register tokens"
    return None


class DMAE(Method):
    """Bai et al. 2023: MAE pixel reconstruction of masked patches + L1 on normalised teacher features of visible patches, then fine-tuning."""

    name = "dmae"
    version = "1"
    domains = frozenset({"classification"})

    class Params(Params):
        # main_distill.py / pretrain.sh --mask_ratio 0.75.
        mask_ratio: float = Field(0.75, gt=0, lt=1, description="fraction of patches masked")
        # pretrain.sh --aligned_blks_indices 8 --teacher_aligned_blks_indices 17 (3/4 depth of ViT-B and ViT-L).
        student_block: int | None = Field(None, ge=0, description="student block aligned (default ceil(0.75 depth) - 1)")
        teacher_block: int | None = Field(None, ge=0, description="teacher block aligned (default ceil(0.75 depth) - 1)")
        # mae_vit_base_patch16_dec512d8b: decoder width 512, 8 blocks, 16 heads.
        decoder_dim: int = Field(512, ge=8, description="MAE decoder width")
        decoder_depth: int = Field(8, ge=1, description="MAE decoder blocks")
        decoder_heads: int = Field(16, ge=1, description="MAE decoder attention heads")
        # The paper's recipe: 100 epochs of distillation pre-training, then 100 epochs of fine-tuning.
        pretrain_fraction: float = Field(0.5, gt=0, le=1, description="share of the step budget spent pre-training")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.head: nn.Module | None = None
        self.info: dict[str, Any] = {}

    def unsupported(self, task: Task) -> str | None:
        if not hasattr(task, "student_is_vit"):
            return "DMAE distils ViT image encoders; this task has no ViT student/teacher"
        if not task.student_is_vit():
            return ("DMAE distils ViT students (masked patches); this cell's student is not a ViT — set "
                    "imagenet.student (and imagenet.teacher) to ViTs, e.g. vit_smoke_32d4 / vit_smoke_64d4")
        if not task.teacher_is_vit():
            return "DMAE matches token features of a ViT teacher; this cell's teacher is not a ViT (set imagenet.teacher)"
        return None

    def generations(self, total_steps: int) -> list[Generation]:
        pre = min(total_steps, max(1, round(self.params.pretrain_fraction * total_steps)))
        plan = [Generation(pre, fresh_student=False, name="distillation pre-training")]
        if total_steps - pre > 0:
            plan.append(Generation(total_steps - pre, fresh_student=False, name="fine-tuning"))
        self.info["steps"] = [g.steps for g in plan]
        return plan

    def _build_head(self, student: nn.Module, teacher: nn.Module, seed: int) -> None:
        import torch
        from bench.methods._modules import MAEHead

        s, t = student.net, teacher.net
        for who, vit in (("student", s), ("teacher", t)):
            reason = why_not_vit(vit)
            if reason:
                raise ValueError(f"DMAE {who}: {reason}")
        if s.patch_embed.num_patches != t.patch_embed.num_patches:
            raise ValueError(f"DMAE needs one patch grid for teacher and student ({t.patch_embed.num_patches} vs "
                             f"{s.patch_embed.num_patches} patches)")
        ps = s.patch_embed.patch_size
        p = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
        rng = torch.random.get_rng_state()  # the head's initialisation must not shift the cell's random stream
        torch.manual_seed(seed + 11)
        self.head = MAEHead(s.embed_dim, t.embed_dim, s.patch_embed.num_patches, p * p * 3, self.params.decoder_dim,
                            self.params.decoder_depth, self.params.decoder_heads)
        torch.random.set_rng_state(rng)
        self.info.update(patch=p, student_block=aligned_block(len(s.blocks), self.params.student_block),
                         teacher_block=aligned_block(len(t.blocks), self.params.teacher_block),
                         student_depth=len(s.blocks), teacher_depth=len(t.blocks), seed=seed,
                         student_dim=s.embed_dim, teacher_dim=t.embed_dim, num_patches=s.patch_embed.num_patches)
        if self.info["student_block"] >= len(s.blocks) or self.info["teacher_block"] >= len(t.blocks):
            raise ValueError(f"DMAE aligned blocks {self.info['student_block']}/{self.info['teacher_block']} exceed the "
                             f"depths {len(s.blocks)}/{len(t.blocks)}")

    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        if self.head is None:
            self._build_head(student, teacher, ctx.seed)
        return student

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"dmae": self.head} if self.head is not None else {}

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        if ctx.generation > 0:  # fine-tuning on labels
            return {"student": ctx.label_loss(ctx.student_outputs(batch), batch)}
        student, p = ctx.student, self.info["patch"]
        images = student.normalize(batch["pixels"])
        b, length = images.shape[0], student.net.patch_embed.num_patches
        ids_keep, ids_restore, mask = random_masking(b, length, self.params.mask_ratio, images.device)
        tb = self.info["teacher_block"]
        _, teacher_feats = ctx.run_teacher(
            lambda t: encode_visible(t.net, t.normalize(batch["pixels"]), ids_keep, upto=tb), n_examples=b)
        outs, latent = encode_visible(student.net, images, ids_keep)
        pred = self.head.decode(latent, ids_restore)
        pixel = masked_pixel_loss(pred, patchify(images, p), mask)
        feat = feature_loss(outs[self.info["student_block"]], teacher_feats, self.head.proj)
        total = pixel + feat
        self._last = {"pixel_loss": float(pixel.detach()), "feature_loss": float(feat.detach())}
        return {"student": total, "dmae": total}

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        return dict(getattr(self, "_last", {})) if ctx.generation == 0 else {}

    def state_dict(self) -> dict[str, Any]:
        return {"info": dict(self.info)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.info = dict(state["info"])
        if "patch" in self.info:  # rebuild the head; the harness restores its weights (an extra module)
            from bench.methods._modules import MAEHead

            self.head = MAEHead(self.info["student_dim"], self.info["teacher_dim"], self.info["num_patches"],
                                self.info["patch"] ** 2 * 3, self.params.decoder_dim, self.params.decoder_depth,
                                self.params.decoder_heads)

    def record_info(self) -> dict[str, Any]:
        return {k: v for k, v in self.info.items() if k != "seed"}
