"""Quality metrics of the ``sam`` task family.

* **mIoU** (SAM, Kirillov et al. 2023, §7.1 point-to-mask evaluation; SlimSAM's validation): the mean over
  prompts of ``|P ∩ G| / |P ∪ G|`` of binary masks at the image's own resolution.
* **Mask AP** (SAM §7.4, zero-shot instance segmentation; TinySAM's ``eval/tinysam_zero_shot_ins_eval.py``,
  xinghaochen/TinySAM @ 11589bc): predictions are RLE-encoded masks with their detector scores, scored by
  pycocotools' ``COCOeval(coco_gt, coco_dt, "segm")`` with its default parameters (IoU 0.50:0.05:0.95,
  101 recall points, maxDets 100, COCO's area ranges). As in TinySAM's script the predictions carry **no**
  ``bbox``: ``COCO.loadRes`` would otherwise take the box branch and set each detection's area to the box
  area, which moves detections between the small/medium/large ranges.

Values are fractions (0.423, not 42.3). pycocotools reports -1 for an area range without ground truth; that
marker is passed through unchanged (``APm = -1.0`` means "no medium objects", not a score).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np

from bench import BenchError

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # the first six of COCOeval.stats, in its order


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """``|P ∩ G| / |P ∪ G|`` of two binary masks of one shape; 1.0 when both are empty (nothing to miss)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise BenchError(f"mask_iou: prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    union = int(np.count_nonzero(pred | gt))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(pred & gt)) / union


def mean_iou(ious: Sequence[float]) -> float:
    """The mean of per-prompt IoUs (each prompt counts once, whatever its object's size)."""
    values = np.asarray(list(ious), dtype=np.float64)
    if values.size == 0:
        raise BenchError("mean_iou: no IoUs to average (the evaluation produced no prompts)")
    if np.any(~np.isfinite(values)) or np.any((values < 0) | (values > 1)):
        raise BenchError(f"mean_iou: IoUs must lie in [0, 1], got min {values.min()} max {values.max()}")
    return float(values.mean())


def encode_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of an (H, W) binary mask, ``counts`` as str so it serialises to JSON."""
    from pycocotools import mask as mask_utils

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise BenchError(f"encode_rle: expected an (H, W) mask, got shape {mask.shape}")
    # pycocotools reads the buffer column-major: it needs a Fortran-ordered uint8 array.
    rle = mask_utils.encode(np.asfortranarray(mask.astype(bool).astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _coco_from_dict(gt: dict):
    from pycocotools.coco import COCO

    missing = [k for k in ("images", "annotations", "categories") if k not in gt]
    if missing:
        raise BenchError(f"coco_mask_ap: the ground truth lacks {missing}; expected a COCO instances dict with "
                         "'images', 'annotations' and 'categories'")
    coco = COCO()
    # COCOeval writes into the GT annotations ('ignore', segmentation -> RLE): give it copies, so the
    # caller's dict stays as loaded (and JSON-serialisable).
    coco.dataset = {**gt, "annotations": [dict(a) for a in gt["annotations"]]}
    coco.createIndex()
    return coco


def coco_mask_ap(gt: dict, predictions: list[dict]) -> dict[str, float]:
    """COCO mask AP of ``predictions`` (``image_id``, ``category_id``, ``segmentation`` RLE, ``score``)
    against the COCO instances dict ``gt``; keys :data:`AP_KEYS`, fractions; all 0.0 without predictions."""
    if not predictions:
        return {k: 0.0 for k in AP_KEYS}
    from pycocotools.cocoeval import COCOeval

    need = ("image_id", "category_id", "segmentation", "score")
    dets = []
    for i, p in enumerate(predictions):
        lacking = [k for k in need if k not in p]
        if lacking:
            raise BenchError(f"coco_mask_ap: prediction {i} lacks {lacking}; each needs {list(need)}")
        # Copies without 'bbox' (loadRes adds 'id', 'area', 'bbox' to what it is given; see module doc).
        dets.append({k: p[k] for k in need})
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the summary table
        coco_gt = _coco_from_dict(gt)
        known = set(coco_gt.getImgIds())
        stray = sorted({d["image_id"] for d in dets} - known)
        if stray:
            raise BenchError(f"coco_mask_ap: predictions for image ids {stray[:5]} that the ground truth does not "
                             f"have ({len(known)} images)")
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(v) for k, v in zip(AP_KEYS, ev.stats[: len(AP_KEYS)])}
