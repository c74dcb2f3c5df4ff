"""ResidualViT — Soldan, Heilbron, Ghanem, Sivic, Russell et al., "ResidualViT for Efficient Temporally Dense Video
Encoding" (ICCV 2025, arXiv 2509.13255). Official code: Soldelli/residualvit @ f07a70c (an open_clip fork:
``src/open_clip/transformer.py`` VisionTransformer.forward, ``src/open_clip/loss.py`` DistillClipLoss,
``scripts/training/ResidualViT_token_dropping.sh``, ``scripts/evaluation/ResidualViT_charades_sta.sh``) and the
evaluation code adobe-research/zs-video-eval @ b9bf878. Read, not copied.

What is implemented:

* **I/P interleaving.** A video is cut into consecutive groups of N + 1 frames; frame 0 of a group (the I-frame)
  goes through the foundation ViT with every token; frames 1..N (P-frames) go through *the same frozen ViT* with
  few tokens plus a residual token made from the group's I-frame. ``n_reduced`` N = 2 (the eval script sweeps
  clip lengths {2, 3, 4, 6, 11}; N = 2 is the setting of the paper's ~56 % saving). A training clip (4 frames
  1 s apart) is one group: frame 0 the anchor, frames 1-3 distilled (``--distill-anchor-target``).
* **Token reduction.** Patch tokens are embedded and get their positional embeddings *before* dropping (kept
  tokens keep their positions); [CLS] is always kept. Kept count ``max(1, int(P (1 - p)))`` in training and
  ``max(1, round(P (1 - p)))`` at inference, p = ``drop_rate`` 0.85 (``PATCH_DROP_RATE``). Training keeps a
  random subset (the official model drops at random in train mode; top-k of uniform noise); inference keeps the
  top-k patches by motion (``motion`` mode: the motion map summed over each patch, plus 1e-6 noise to break ties;
  ``center`` and ``random`` modes are options).
* **Residual token.** ``Linear(D -> width)`` with bias (PyTorch's default init) of the I-frame's final, L2-normalised
  embedding *from the frozen teacher*, inserted at position 1 (after [CLS], before the kept patches), with no
  positional embedding, through ``ln_pre`` with the other tokens. The output is [CLS] -> ``ln_post`` -> ``proj``,
  as CLIP. **Only this projection trains** (``--lock-image``; the ViT is the teacher's, frozen; the text encoder
  and logit scale are the teacher's, frozen).
* **Loss** (``loss_version=ce``, ``--distill-vision-tower-only``, ``--distill-no-contrastive-loss``): for each
  P-frame, the soft-target cross-entropy ``-sum_j softmax(s * t_i . text_j) log softmax(s * z_i . text_j)`` over
  the batch's sentences, ``t_i`` the teacher's all-token feature of the same frame, ``z_i`` the student's, ``s``
  the logit scale (100 for the OpenAI CLIP the paper uses; here the teacher's own), averaged over the clips and the
  3 P-frame positions; the I-frame is not in the loss. The ``mse`` variant (an option) is
  ``100 * mean_i ||z_i - t_i||^2 / sqrt(D)``.
* **Optimiser** (training script): AdamW (0.9, 0.98), eps 1e-6, lr 5e-4 constant, no warm-up, weight decay 0
  (``optim_overrides``); the step budget and batch size are the task's.

Deviations: the task's data, not WebVid-2.5M (5 epochs at 2,048 clips per step); the logit scale is the task
teacher's rather than 100; in-batch sentences of one process (the official run all-gathers 4 GPUs' captions);
inference motion comes from per-patch frame differences (`tasks/charades_sta/data.motion`), not the codec motion
vectors of the official h5 files (whose exact contents are not published); no clip-level augmentation (random
resized crop, flip), since the task's clips are fixed functions of their index.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bench import BenchError
from bench.api import Method, Params
from bench.tasks.charades_sta.model import OnTeacher

if TYPE_CHECKING:
    from bench.api import Batch, StepContext


def kept_tokens(n_patches: int, drop_rate: float, training: bool) -> int:
    """Patch tokens a P-frame keeps: floor in training, round at inference (the official code's two paths)."""
    keep = n_patches * (1.0 - drop_rate)
    return max(1, int(keep) if training else int(round(keep)))


def select_patches(mode: str, n_keep: int, grid: tuple[int, int], batch: int, motion: torch.Tensor | None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices (batch, n_keep) into the h*w patch tokens (row-major) that a P-frame keeps.

    ``random``: top-k of uniform noise. ``motion``: top-k of the per-patch motion (``motion`` (batch, h, w), the
    motion summed over each patch) + 1e-6 noise. ``center``: the patches nearest the grid centre (squared
    distance; the official code's row index has a true-division slip that this does not reproduce)."""
    h, w = grid
    n = h * w
    dev = motion.device if motion is not None else "cpu"
    if mode == "random":
        return torch.rand(batch, n, generator=generator, device=dev).topk(n_keep, dim=1).indices
    if mode == "motion":
        if motion is None:
            raise BenchError("residualvit: motion-based token selection needs the task's per-patch motion")
        noise = 1e-6 * torch.rand(batch, n, generator=generator, device=dev)
        return (motion.reshape(batch, n).float() + noise).topk(n_keep, dim=1).indices
    if mode == "center":
        i = torch.arange(n, device=dev)
        d = (i // w - (h - 1) / 2) ** 2 + (i % w - (w - 1) / 2) ** 2
        return torch.argsort(d, stable=True)[:n_keep].expand(batch, n_keep)
    raise BenchError(f"residualvit: unknown token selection {mode!r}; valid: motion, random, center")


class ResidualViTModel(OnTeacher):
    """The teacher's frozen CLIP + a residual projection: I-frames in full, P-frames with kept tokens + residual."""

    def __init__(self, teacher: nn.Module, n_reduced: int, drop_rate: float, selection: str) -> None:
        super().__init__(teacher)
        visual = self.base.visual
        embed_dim = int(visual.proj.shape[1]) if visual.proj is not None else int(visual.class_embedding.shape[0])
        width = int(visual.class_embedding.shape[0])
        self.residual_proj = nn.Linear(embed_dim, width)  # PyTorch's default init, as the official module
        self.n_reduced, self.drop_rate, self.selection = int(n_reduced), float(drop_rate), selection

    def encode_reduced(self, images: torch.Tensor, motion: torch.Tensor | None,
                       anchor: torch.Tensor | None = None) -> torch.Tensor:
        """P-frames (B, 3, H, W) with their I-frames' normalised embeddings ``anchor`` (B, D) -> (B, D) normalised.
        Without ``anchor`` (the per-frame cost probe) the frame's own full embedding stands in for it."""
        from bench.tasks.charades_sta.model import grid_size, vit_head, vit_tokens

        if anchor is None:
            with torch.no_grad():
                anchor = self.base.encode_frames(images)
        visual = self.visual
        tokens = vit_tokens(visual, images)  # positions added before dropping
        grid = grid_size(visual)
        n_keep = kept_tokens(grid[0] * grid[1], self.drop_rate, self.training)
        mode = "random" if self.training else self.selection
        idx = select_patches(mode, n_keep, grid, images.shape[0], motion)  # the harness-seeded global stream
        patches = torch.gather(tokens[:, 1:], 1, idx[..., None].expand(-1, -1, tokens.shape[-1]))
        residual = self.residual_proj(anchor.detach().to(tokens.dtype))[:, None]
        x = torch.cat([tokens[:, :1], residual, patches], dim=1)
        return F.normalize(vit_head(visual, x), dim=-1)

    def encode_video(self, frames: torch.Tensor, motion: torch.Tensor | None = None,
                     anchor_every: int | None = None) -> torch.Tensor:
        """(B, T, 3, H, W) -> (B, T, D): groups of ``anchor_every`` (default N + 1) frames, the first in full."""
        b, t = frames.shape[:2]
        group = int(anchor_every or self.n_reduced + 1)
        is_i = torch.arange(t, device=frames.device) % group == 0
        out = torch.empty(b, t, self.base.clip.visual.output_dim, device=frames.device, dtype=frames.dtype)
        with torch.no_grad():
            i_feats = self.base.encode_frames(frames[:, is_i].flatten(0, 1)).view(b, int(is_i.sum()), -1)
        out[:, is_i] = i_feats.to(out.dtype)
        p_idx = (~is_i).nonzero().flatten()
        if len(p_idx):
            anchor = i_feats[:, p_idx // group]  # each P-frame's own group's I-frame
            mot = motion[:, p_idx].flatten(0, 1) if motion is not None else None
            p = self.encode_reduced(frames[:, p_idx].flatten(0, 1), mot, anchor.flatten(0, 1))
            out = out.clone()
            out[:, p_idx] = p.view(b, len(p_idx), -1).to(out.dtype)
        return out

    def reduced_mask(self, t: int) -> Any:
        import numpy as np

        return np.arange(t) % (self.n_reduced + 1) != 0

    def schedule(self) -> dict[str, Any]:
        n = self.n_reduced
        return {"kind": f"ResidualViT: 1 full frame then {n} reduced (drop rate {self.drop_rate:g}, "
                        f"{self.selection} selection, residual token)", "reduced_fraction": n / (n + 1)}


def soft_target_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """-sum_j softmax(teacher)_j log softmax(student)_j, averaged over rows (DistillClipLoss.loss_ce)."""
    p = F.softmax(teacher_logits.detach().float(), dim=-1)
    return -(p * F.log_softmax(student_logits.float(), dim=-1)).sum(-1).mean()


def feature_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The official ``mse`` variant: 100 * mean over rows of the squared distance / sqrt(D)."""
    d = student.shape[-1]
    return 100.0 * ((student.float() - teacher.detach().float()) ** 2).sum(-1).div(math.sqrt(d)).mean()


class ResidualViT(Method):
    """Soldan et al. 2025: I/P interleaving, P-frames with 15% of their tokens + a residual token from the I-frame; only the residual projection trains (soft-target CE on image->text logits)."""

    name = "residualvit"
    version = "1"
    domains = frozenset({"grounding"})
    # ResidualViT_token_dropping.sh: --lr 5e-4, --warmup 0, --wd 0, constant schedule; AdamW (0.9, 0.98), 1e-6.
    optim_overrides = {"lr": 5e-4, "weight_decay": 0.0, "warmup_ratio": 0.0, "schedule": "constant",
                       "betas": (0.9, 0.98), "eps": 1e-6}

    class Params(Params):
        # ResidualViT_charades_sta.sh sweeps clip lengths {2,3,4,6,11}; N = 2 gives the paper's ~56% saving.
        n_reduced: int = Field(2, ge=1, le=30, description="N: reduced (P) frames after each full (I) frame")
        # PATCH_DROP_RATE=0.85 in both scripts: 15% of the patch tokens are kept on P-frames.
        drop_rate: float = Field(0.85, ge=0.0, lt=1.0, description="share of patch tokens a P-frame drops")
        # the evaluation script's inference mode (USE_MOTION_VECTORS=True)
        selection: Literal["motion", "random", "center"] = Field("motion", description="which patch tokens a "
                                                                                       "P-frame keeps at inference")
        # loss_version=ce in the training script; mse is the code's other variant
        loss: Literal["ce", "mse"] = Field("ce", description="soft-target CE on image->text logits, or feature MSE")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.info: dict[str, Any] = {}

    def init_student(self, teacher: nn.Module, student: nn.Module, ctx: StepContext) -> nn.Module:
        if teacher is None or not hasattr(teacher, "encode_video"):
            raise BenchError("residualvit needs the charades_sta task's teacher (a VideoCLIP)")
        p = self.params
        model = ResidualViTModel(teacher, p.n_reduced, p.drop_rate, p.selection)
        trainable = sum(x.numel() for x in model.parameters() if x.requires_grad)
        self.info.update(schedule=model.schedule(), trainable_params=trainable,
                         frozen="the teacher's ViT, text encoder and logit scale")
        return model

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        out = ctx.student_outputs(batch)  # (B, F, D): frame 0 the I-frame, frames 1.. P-frames
        target = ctx.teacher_outputs(batch).logits  # the teacher's all-token features, (B, F, D)
        z, t = out.logits[:, 1:], target[:, 1:]
        if self.params.loss == "mse":
            loss = feature_mse(z.flatten(0, 1), t.flatten(0, 1))
        else:
            text, scale = out.extras["text"].detach(), out.extras["scale"].detach()
            loss = torch.stack([soft_target_ce(scale * z[:, f] @ text.T, scale * t[:, f] @ text.T)
                                for f in range(z.shape[1])]).mean()
        self._last = {"distill": float(loss.detach())}
        return {"student": loss}

    def on_step_end(self, ctx: StepContext) -> dict[str, float]:
        return dict(getattr(self, "_last", {}))

    def state_dict(self) -> dict[str, Any]:
        return {"info": dict(self.info)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.info = dict(state["info"])

    def record_info(self) -> dict[str, Any]:
        return dict(self.info)
