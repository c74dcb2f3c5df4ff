"""SAM's supervised mask loss (Kirillov et al., "Segment Anything", ICCV 2023, appendix A, "Losses and
training"), as public helpers the task's ``label_loss`` and the segmentation methods share.

What the paper fixes: masks are supervised with "a linear combination of focal loss and dice loss" in a
**20:1** ratio; with multiple output masks (K = 3) "we backprop only the minimum loss over masks"; the IoU
prediction head is trained with a **mean-square error** between its prediction and the predicted mask's IoU
with the ground truth, added with weight 1.

What the paper leaves open, and the choices here (source: the official SAM 2 training code,
``facebookresearch/sam2 training/loss_fns.py``, the public training setup of the SAM family, whose
``MultiStepMultiMasksAndIous`` implements exactly the rules above):

* focal loss (Lin et al. 2017) with **alpha = 0.25, gamma = 2** (``sigmoid_focal_loss`` defaults there), averaged
  over the pixels of each mask;
* dice loss ``1 - (2 sum(p g) + 1) / (sum(p) + sum(g) + 1)`` on sigmoid probabilities, smoothing 1 (there, in its
  L1 form, identical for binary targets);
* the mask with the smallest ``20 focal + dice`` is the one back-propagated; its IoU prediction alone is
  supervised by default ("to be consistent w/ SAM", as that code says; ``supervise_all_iou=True`` supervises
  all K, the option SAM 2's configs switch on); the IoU target is the IoU of the mask binarised at logit 0,
  union clamped to 1 pixel (0 when both masks are empty), not differentiated;
* masks are compared at the input resolution S: the decoder's S/4 logits are upsampled bilinearly (as
  ``Sam.postprocess_masks`` does) before the loss. The padding region (ground truth 0) is included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from bench.api import Batch, Outputs

FOCAL_WEIGHT = 20.0  # SAM appendix A: focal : dice = 20 : 1
DICE_WEIGHT = 1.0
IOU_WEIGHT = 1.0  # SAM appendix A: "a constant scaling factor of 1.0"
FOCAL_ALPHA = 0.25  # sam2 training/loss_fns.py sigmoid_focal_loss defaults (RetinaNet's values)
FOCAL_GAMMA = 2.0


def sigmoid_focal(logits: torch.Tensor, gt: torch.Tensor, alpha: float = FOCAL_ALPHA,
                  gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """Focal loss of (N, H, W) logits against 0/1 targets, averaged over each mask's pixels -> (N,)."""
    gt = gt.to(logits.dtype)
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, gt, reduction="none")
    p_t = p * gt + (1 - p) * (1 - gt)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * gt + (1 - alpha) * (1 - gt)) * loss
    return loss.flatten(1).mean(1)


def dice(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Dice loss ``1 - (2 sum(p g) + 1) / (sum p + sum g + 1)`` of (N, H, W) logits -> (N,)."""
    p = logits.sigmoid().flatten(1)
    g = gt.to(p.dtype).flatten(1)
    return 1 - (2 * (p * g).sum(1) + 1) / (p.sum(1) + g.sum(1) + 1)


def sam_focal_dice(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """SAM's mask loss per mask: ``20 focal + 1 dice`` of (N, H, W) logits vs (N, H, W) 0/1 masks -> (N,)."""
    return FOCAL_WEIGHT * sigmoid_focal(logits, gt) + DICE_WEIGHT * dice(logits, gt)


@torch.no_grad()
def mask_ious(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """IoU of each (N, H, W) mask binarised at logit 0 with its 0/1 ground truth -> (N,), not differentiated
    (union clamped to 1: two empty masks give 0, as in SAM 2's ``iou_loss``)."""
    pred = logits.flatten(1) > 0
    g = gt.flatten(1) > 0.5
    inter = (pred & g).sum(1).float()
    union = (pred | g).sum(1).float().clamp(min=1.0)
    return inter / union


def upscale_to(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., h, w) logits bilinearly resized to (..., *size) (``Sam.postprocess_masks``' first step)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    lead = logits.shape[:-2]
    flat = logits.reshape(-1, 1, *logits.shape[-2:])
    return F.interpolate(flat, size, mode="bilinear", align_corners=False).reshape(*lead, *size)


def per_mask_losses(logits: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss (N, K), iou (N, K))``: SAM's focal+dice loss and the actual IoU of each of K masks.

    ``logits`` (N, K, h, w) decoder logits at any resolution; ``gt`` (N, S, S) 0/1 masks; logits are upsampled
    to S first."""
    n, k = logits.shape[:2]
    up = upscale_to(logits, tuple(gt.shape[-2:]))
    target = gt[:, None].expand(n, k, *gt.shape[-2:]).reshape(n * k, *gt.shape[-2:])
    flat = up.reshape(n * k, *gt.shape[-2:])
    return sam_focal_dice(flat, target).view(n, k), mask_ious(flat, target).view(n, k)


def sam_mask_loss(logits: torch.Tensor, iou_pred: torch.Tensor, gt: torch.Tensor,
                  supervise_all_iou: bool = False) -> torch.Tensor:
    """SAM's loss per prompt (N,): the K-minimum focal+dice plus the IoU head's squared error (see the
    module docstring). ``logits`` (N, K, h, w), ``iou_pred`` (N, K), ``gt`` (N, S, S)."""
    loss, actual = per_mask_losses(logits, gt)
    best = loss.argmin(1)
    rows = torch.arange(loss.shape[0], device=loss.device)
    sq = (iou_pred.float() - actual) ** 2
    iou_term = sq.mean(1) if supervise_all_iou else sq[rows, best]
    return loss[rows, best] + IOU_WEIGHT * iou_term


def sam_label_loss(outputs: Outputs, batch: Batch, supervise_all_iou: bool = False) -> torch.Tensor:
    """The task's ``label_loss``: `sam_mask_loss` averaged over the batch's valid prompts.

    ``outputs.logits`` (B, P, K, h, w) and ``outputs.extras["iou"]`` (B, P, K) as `Task.forward` returns them;
    ``batch["gt_masks"]`` (B, P, S, S) and ``batch["valid"]`` (B, P). A batch without valid prompts gives a zero
    that still depends on the logits (so backward runs)."""
    logits = outputs.logits
    iou = (outputs.extras or {}).get("iou")
    if logits is None or iou is None:
        raise ValueError("sam_label_loss needs Outputs.logits and Outputs.extras['iou'] (the task's forward)")
    valid = batch["valid"].bool()
    if not bool(valid.any()):
        return logits.sum() * 0.0
    per = sam_mask_loss(logits[valid], iou[valid], batch["gt_masks"][valid], supervise_all_iou)
    return per.mean()
