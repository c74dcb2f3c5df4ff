"""Prompts and the model input frame of the ``sam`` task family.

* **Input frame** (SAM, Kirillov et al. 2023, §3 and ``segment_anything.utils.transforms.ResizeLongestSide``
  / ``Sam.preprocess``): an image is resized so its longest side is ``S`` (each side ``int(side * S /
  max(h, w) + 0.5)``), normalised with SAM's pixel mean/std, and zero-padded at the bottom and right to
  ``S x S``. Padding happens *after* normalisation, as in ``Sam.preprocess``, so the padded region is the
  mean colour, not black. Point and box coordinates follow the same per-axis scale (``apply_coords``).
  Coordinates are pixel indices, x (column) first; SAM's prompt encoder adds the half-pixel shift itself
  (``PromptEncoder._embed_points``: ``points + 0.5``), so no +0.5 is added here.
* **Point prompts** (SAM §7.1 and appendix D.1, following RITM, Sofiiuk et al. 2022): the first point is the
  point farthest from the object boundary, i.e. the maximum of the mask's Euclidean distance transform;
  each further point is the farthest point of the larger error region (false negatives -> a foreground
  point, false positives -> a background point). The image border counts as background (the mask is padded
  with one pixel of background before the transform, as RITM's clicker pads its error masks), so an object
  cut by the border gets its point inside, not on the border.
* **Tie-breaking** (deterministic, RITM's rule): among pixels at the maximal distance, the first in
  row-major order (smallest y, then smallest x) wins; between the two error regions, false negatives win
  only when their maximal distance is strictly larger (RITM: ``is_positive = fn_max_dist > fp_max_dist``).
* **Boxes**: COCO ``[x, y, w, h]`` -> xyxy ``(x, y, x + w, y + h)`` (TinySAM's
  ``eval/tinysam_zero_shot_ins_eval.py`` prompts with the detector's boxes converted this way); a mask's
  tight box is ``(min x, min y, max x + 1, max y + 1)``, the pixel-edge extent COCO's ``toBbox`` reports.

Deviation: RITM's evaluation also stops re-clicking pixels it already clicked (``not_clicked_map``); SAM's
description does not mention it and it is not done here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bench import BenchError

# SAM's normalisation on 0-255 pixels (segment_anything.build_sam: pixel_mean / pixel_std).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def resize_longest(h: int, w: int, target: int) -> tuple[int, int]:
    """``(new_h, new_w)`` with the longest side ``target``; SAM rounds half up: ``int(side * scale + 0.5)``."""
    if h <= 0 or w <= 0 or target <= 0:
        raise BenchError(f"resize_longest: sizes must be positive, got h={h}, w={w}, target={target}")
    scale = target / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_image(image: np.ndarray, target: int) -> np.ndarray:
    """An (H, W, 3) uint8 image resized (PIL bilinear, as ResizeLongestSide.apply_image through
    torchvision's PIL resize) so its longest side is ``target``; not padded."""
    from PIL import Image

    image = _check_image(image)
    nh, nw = resize_longest(image.shape[0], image.shape[1], target)
    if (nh, nw) == image.shape[:2]:
        return image.copy()
    return np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))


def sam_input(image: np.ndarray, target: int) -> np.ndarray:
    """The model input of an (H, W, 3) uint8 image: float32 (3, S, S), resized, normalised, then padded
    bottom-right with zeros (``Sam.preprocess`` order)."""
    small = resize_image(image, target).astype(np.float32)
    normed = (small - np.asarray(PIXEL_MEAN, np.float32)) / np.asarray(PIXEL_STD, np.float32)
    out = np.zeros((3, target, target), np.float32)
    out[:, : normed.shape[0], : normed.shape[1]] = normed.transpose(2, 0, 1)
    return out


def resize_pad_mask(mask: np.ndarray, target: int) -> np.ndarray:
    """An (H, W) mask in the input frame: bool (S, S), resized like the image and padded with False.

    Resampling is PIL bilinear (area-weighted when shrinking) of the 0/255 mask, kept where the weight is at
    least half: a pixel is in the resized mask when the object covers most of it, so thin parts neither grow
    nor vanish as they can with nearest-neighbour sampling."""
    from PIL import Image

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise BenchError(f"resize_pad_mask: expected an (H, W) mask, got shape {mask.shape}")
    nh, nw = resize_longest(mask.shape[0], mask.shape[1], target)
    m = mask.astype(bool).astype(np.uint8) * 255
    if (nh, nw) != m.shape:
        m = np.asarray(Image.fromarray(m).resize((nw, nh), Image.BILINEAR))
    out = np.zeros((target, target), bool)
    out[:nh, :nw] = m >= 128
    return out


def transform_coords(coords, hw: tuple[int, int], target: int) -> np.ndarray:
    """Points ``(..., 2)`` as (x, y) in an image of size ``hw`` -> the input frame (per-axis scale
    ``new_w / w``, ``new_h / h``, as ResizeLongestSide.apply_coords)."""
    h, w = hw
    nh, nw = resize_longest(h, w, target)
    c = np.array(coords, dtype=np.float64)
    if c.shape[-1:] != (2,):
        raise BenchError(f"transform_coords: expected points of shape (..., 2) as (x, y), got {c.shape}")
    c[..., 0] *= nw / w
    c[..., 1] *= nh / h
    return c


def transform_boxes(boxes, hw: tuple[int, int], target: int) -> np.ndarray:
    """xyxy boxes ``(..., 4)`` in an image of size ``hw`` -> the input frame (both corners as points)."""
    b = np.array(boxes, dtype=np.float64)
    if b.shape[-1:] != (4,):
        raise BenchError(f"transform_boxes: expected xyxy boxes of shape (..., 4), got {b.shape}")
    return transform_coords(b.reshape(*b.shape[:-1], 2, 2), hw, target).reshape(b.shape)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise BenchError(f"expected an (H, W, 3) uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    return image


def _padded_edt(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of each mask pixel to the nearest background pixel, the image border counting as
    background (one pixel of padding, removed again)."""
    from scipy.ndimage import distance_transform_edt

    padded = np.pad(np.asarray(mask, bool), 1, constant_values=False)
    return distance_transform_edt(padded)[1:-1, 1:-1]


def _first_max(dist: np.ndarray) -> tuple[float, float]:
    # np.argmax returns the first maximum in C (row-major) order: the documented tie-break.
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(x), float(y)


def center_point(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of the mask pixel farthest from the background (SAM §7.1 / D.1; border = background; ties ->
    first in row-major order)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise BenchError(f"center_point: expected an (H, W) mask, got shape {mask.shape}")
    if not mask.any():
        raise BenchError("center_point: the mask is empty; a point prompt needs at least one object pixel")
    return _first_max(_padded_edt(mask))


def next_point(gt: np.ndarray, pred: np.ndarray) -> tuple[tuple[float, float], int]:
    """The next corrective click ``((x, y), label)`` for prediction ``pred`` of ground truth ``gt``.

    False negatives (gt & ~pred) and false positives (~gt & pred) are distance-transformed (border =
    background); the region with the larger maximal distance gets the click at its first maximum, label 1
    for false negatives, 0 for false positives; ties go to the false positives (RITM's strict ``>``). When
    the prediction is exact there is no error region: the click is the gt's :func:`center_point` with label
    1, which asks for nothing new (the protocol never needs it for a mask it has already matched)."""
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.shape != pred.shape or gt.ndim != 2:
        raise BenchError(f"next_point: gt and pred must be (H, W) masks of one shape, got {gt.shape} and {pred.shape}")
    fn = _padded_edt(gt & ~pred)
    fp = _padded_edt(~gt & pred)
    fn_max, fp_max = float(fn.max()), float(fp.max())
    if fn_max == 0.0 and fp_max == 0.0:
        return center_point(gt), 1
    if fn_max > fp_max:
        return _first_max(fn), 1
    return _first_max(fp), 0


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight xyxy box of a mask: (min x, min y, max x + 1, max y + 1)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise BenchError(f"mask_box: expected an (H, W) mask, got shape {mask.shape}")
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise BenchError("mask_box: the mask is empty; a box needs at least one object pixel")
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def coco_box_xyxy(bbox_xywh: Sequence[float]) -> tuple[float, float, float, float]:
    """COCO ``[x, y, w, h]`` -> ``(x1, y1, x2, y2)``."""
    try:
        x, y, w, h = (float(v) for v in bbox_xywh)
    except (TypeError, ValueError) as exc:
        raise BenchError(f"a COCO bbox must be 4 numbers [x, y, width, height], got {bbox_xywh!r}") from exc
    if w < 0 or h < 0:
        raise BenchError(f"a COCO bbox [x, y, width, height] needs width, height >= 0, got {bbox_xywh!r}")
    return x, y, x + w, y + h
