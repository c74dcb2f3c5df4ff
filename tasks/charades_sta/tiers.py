"""Tier constants and model configurations of the ``charades_sta`` task (the package docstring says what each
tier is and why).

Budgets: AdamW with a cosine schedule for the tasks' own CLIP training (CLIP: AdamW, beta2 0.98, eps 1e-6,
weight decay 0.2, cosine; Radford et al. 2021, §2.5), at CPU batch sizes; ResidualViT's own recipe (lr 5e-4
constant, no warm-up, weight decay 0) is the method's ``optim_overrides``.
"""

from __future__ import annotations

from typing import Any

from bench.api import OptimConfig

from .model import ClipConfig

FPS = 3.0  # the protocol's frame rate (zs-video-eval's Charades-STA script)
CLIP_FRAMES = 4  # frames per training clip (ResidualViT's training: 4 frames per clip, frame 0 the anchor)
CLIP_SPACING = 1.0  # seconds between a training clip's frames (ResidualViT trains at 1 fps)
TRAIN_SEED, EVAL_SEED = 21, 22
DATA_DIR = "charades_sta"

TIERS: dict[str, dict[str, Any]] = {
    # seconds per cell on a CPU
    "smoke": {"image_size": 32, "batch_size": 16, "steps": 20, "teacher_steps": 300, "train_size": 512,
              "eval_queries": 12, "durations": (8.0, 16.0)},
    # CPU minutes per cell
    "small": {"image_size": 64, "batch_size": 32, "steps": 300, "teacher_steps": 800, "train_size": 12_408,
              "eval_queries": 400},
}

TEACHER_OPTIM = OptimConfig(lr=1e-3, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6, warmup_ratio=0.05,
                            schedule="cosine", grad_clip=1.0,
                            source="CLIP (Radford et al. 2021, §2.5): AdamW beta2 0.98, eps 1e-6, weight decay 0.2, "
                                   "cosine; lr 1e-3 chosen for a tiny CLIP trained from scratch on a CPU")
STUDENT_OPTIM = OptimConfig(lr=5e-4, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6, warmup_ratio=0.05,
                            schedule="cosine", grad_clip=1.0,
                            source="CLIP's AdamW settings (Radford et al. 2021); lr 5e-4 as ResidualViT's training "
                                   "script; every method's default on this task")


def configs(tier: str) -> tuple[ClipConfig, ClipConfig]:
    """(teacher, student) CLIP configurations; the student's text tower is the teacher's (copied, frozen)."""
    if tier == "smoke":
        text = {"text_width": 32, "text_layers": 1, "text_heads": 2, "context_length": 16}
        return (ClipConfig(embed_dim=32, image_size=32, patch_size=8, width=32, layers=2, heads=2, **text),
                ClipConfig(embed_dim=32, image_size=32, patch_size=8, width=16, layers=1, heads=2, **text))
    text = {"text_width": 128, "text_layers": 2, "text_heads": 4, "context_length": 32}
    # teacher: a ViT-B/32-shaped miniature (8 x 8 patch grid at 64 px); student: half width, half depth
    return (ClipConfig(embed_dim=128, image_size=64, patch_size=8, width=128, layers=4, heads=4, **text),
            ClipConfig(embed_dim=128, image_size=64, patch_size=8, width=64, layers=2, heads=2, **text))
