"""The task's supervised loss: CLIP's symmetric contrastive loss (Radford et al. 2021, Figure 3) per frame.

For frame position f of the B training clips, ``logits = scale * frame_f @ text.T`` (B x B, features normalised)
and the loss is the mean of the image->text and text->image cross-entropies. Identical sentences in a batch are
positives of each other (targets spread uniformly over them), so a repeated caption is not pushed away from its
own frames. The per-frame losses are averaged over the clip's frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j targets_ij log softmax(logits)_ij."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def clip_loss(frames: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, caption_id: torch.Tensor) -> torch.Tensor:
    """``frames`` (B, F, D) and ``text`` (B, D) normalised; ``caption_id`` (B,) equal for identical sentences."""
    same = (caption_id[:, None] == caption_id[None, :]).float()
    targets = same / same.sum(-1, keepdim=True)
    losses = []
    for f in range(frames.shape[1]):
        logits = scale * frames[:, f] @ text.T
        losses.append(0.5 * (soft_ce(logits, targets) + soft_ce(logits.T, targets.T)))
    return torch.stack(losses).mean()
