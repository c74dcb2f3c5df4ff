"""Tier constants and model configurations of the ``sam`` task (see the package docstring for what each tier
is and why).

Budgets: AdamW with cosine decay. SAM (Kirillov et al. 2023, appendix A) trained with AdamW (0.9, 0.999), lr
8e-4, weight decay 0.1, 250 warm-up iterations at 256 images per batch; the CPU tiers train on 4 images x P
prompts per step, so their learning rates are chosen for a few hundred steps (``OptimConfig.source`` says so).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.api import OptimConfig

if TYPE_CHECKING:
    from .model import SamConfig

COCO_SUBSET = "coco_val_subset"
COCO_SAMPLE = "coco_sample"
TRAIN_SEED, EVAL_SEED = 11, 12  # generated scenes: training and (smoke) evaluation streams

#: Per-tier sizes. ``shapes``: shapes drawn per generated scene (inclusive range). ``teacher_points``: the
#: task's teacher trains on point prompts too (half its batches); the smoke teacher trains on boxes only, since
#: in 400 steps the tiny model learns no point prompts either way and mixing halves what it learns of boxes
#: (measured: box mIoU 0.41 with boxes only, 0.34 with a quarter of the batches point-prompted, 0.04 with half).
TIERS: dict[str, dict[str, Any]] = {
    # seconds per cell on a CPU
    "smoke": {"img_size": 64, "embed_dim": 64, "prompts": 4, "batch_size": 4, "steps": 30, "teacher_steps": 400,
              "train_size": 256, "eval_images": 24, "shapes": (2, 5), "teacher_points": False},
    # CPU minutes per cell (~0.6 s per student step, ~1.1 s per teacher step at 1 thread)
    "small": {"img_size": 256, "embed_dim": 128, "prompts": 8, "batch_size": 4, "steps": 300, "teacher_steps": 2000,
              "train_size": 4000, "eval_images": None, "shapes": (3, 8), "teacher_points": True},
}

SMOKE_OPTIM = OptimConfig(lr=2e-3, weight_decay=0.1, warmup_ratio=0.05, schedule="cosine", grad_clip=1.0,
                          source="tiny SAM models from scratch on CPU: AdamW 2e-3 (chosen on the smoke teacher: 400 steps leave "
                                 "the empty-mask plateau; 4e-3 learns less), weight decay 0.1 (SAM appendix A)")
SMALL_OPTIM = OptimConfig(lr=5e-4, weight_decay=0.1, warmup_ratio=0.05, schedule="cosine", grad_clip=1.0,
                          source="SAM appendix A: AdamW, weight decay 0.1, lr 8e-4 at 256 images per batch; 5e-4 "
                                 "chosen for a few hundred CPU steps of 4 images x 8 prompts")
FULL_OPTIM = OptimConfig(lr=8e-4, weight_decay=0.1, warmup_ratio=0.01, schedule="cosine", grad_clip=1.0,
                         source="SAM appendix A: AdamW (0.9, 0.999), lr 8e-4, weight decay 0.1, linear warm-up; "
                                "cosine instead of its step decay")


@dataclass(frozen=True)
class ModelSpec:
    """A teacher or student: a name, its architecture, where its weights come from."""

    name: str
    config: Any  # SamConfig
    description: str
    checkpoint: str | None = None  # a local official checkpoint (full tier)
    checkpoint_field: str = "sam.teacher_checkpoint"  # the parameter that gave it (named in load errors)


def smoke_configs() -> tuple[SamConfig, SamConfig]:
    from .model import SamConfig

    # SAM's decoder proportions at C = 64: MLP 8 C, IoU head C, attention heads of SAM's width 16 (its
    # cross-attention runs at C / 2 = 128 with 8 heads). Narrower decoders sit longer at "predict nothing"
    # (measured on this teacher: C 32 with 4 heads of width 4 reaches box mIoU 0.27 after 450 steps, C 64 with
    # 2 heads of width 16 reaches 0.41 after 400).
    dec = {"embed_dim": 64, "decoder_heads": 2, "decoder_mlp_dim": 512, "iou_head_hidden_dim": 64,
           "img_size": TIERS["smoke"]["img_size"]}
    teacher = SamConfig(encoder="vit", vit_dim=64, vit_depth=4, vit_heads=4, vit_window=0, vit_global=(), **dec)
    student = SamConfig(encoder="tinyvit", tinyvit_dims=(16, 32, 48), tinyvit_depths=(1, 1, 1),
                        tinyvit_heads=(1, 2, 3), tinyvit_windows=(4, 4, 4), **dec)
    return teacher, student


def small_configs() -> tuple[SamConfig, SamConfig]:
    from .model import SamConfig

    # SAM's decoder proportions at C = 128: MLP 8 C, IoU head C, heads of SAM's width 16.
    dec = {"embed_dim": 128, "decoder_heads": 4, "decoder_mlp_dim": 1024, "iou_head_hidden_dim": 128,
           "img_size": TIERS["small"]["img_size"]}
    teacher = SamConfig(encoder="lite0", pretrained=True, **dec)
    student = SamConfig(encoder="tinyvit", tinyvit_dims=(32, 64, 128), tinyvit_depths=(2, 2, 4),
                        tinyvit_heads=(1, 2, 4), tinyvit_windows=(8, 8, 8), **dec)
    return teacher, student


def small_vit_teacher() -> SamConfig:
    """The small tier's second teacher: a plain SAM ViT (``ImageEncoderViT``, width 192, 6 blocks, 3 heads, windows
    of 8 with global attention in blocks 2 and 5 as SAM-B's pattern of every third block), trained by the task
    from scratch (no pretrained ViT ships offline). It is in the pool for methods that prune a ViT (SlimSAM)."""

    teacher, _ = small_configs()
    return teacher.model_copy(update={"encoder": "vit", "pretrained": False, "vit_dim": 192, "vit_depth": 6,
                                      "vit_heads": 3, "vit_window": 8, "vit_global": (2, 5)})


def sha256_files(paths: list[Path]) -> str:
    from bench.hashing import update_from_file

    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        update_from_file(h, p)
    return h.hexdigest()


def lite0_identity() -> str:
    """md5 of the EfficientNet-Lite0 weights file (the small teacher's starting point)."""
    from ..imagenet import data as idata
    from ..imagenet.models import lite0_weights_path

    return idata.file_md5(Path(lite0_weights_path()))
