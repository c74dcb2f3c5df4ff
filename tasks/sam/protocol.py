"""The zero-shot evaluation protocols of the ``sam`` task (Kirillov et al., "Segment Anything", ICCV 2023).

* **Box prompts** (SAM §7.4 with ground-truth boxes; TinySAM's ``eval/tinysam_zero_shot_ins_eval.py``,
  xinghaochen/TinySAM @ 11589bc, with detector boxes): each non-crowd instance is prompted by its box; the
  model returns 3 masks (multimask output, the predictor's default) and the one with the highest *predicted*
  IoU is kept (``masks[argmax(ious)]`` in that script). The kept mask is scored two ways: its IoU with the
  instance's mask (``box_miou``, the mean over instances) and COCO mask AP (``COCOeval(..., "segm")``, each
  prediction carrying the prompted instance's category and, as its score, the **predicted IoU** of the kept
  mask; crowd annotations are not prompted but stay in the ground truth, where COCOeval treats them as
  ignore regions, as COCO does). With detector boxes (full tier, ``boxes_json``) the detector's category
  and score are kept instead, as in TinySAM's script.
* **Point prompts** (SAM §7.1): one foreground point at the maximum of the mask's distance transform
  (`prompts.center_point`); the most confident of the 3 masks is scored (``point_miou``), and the best of the
  3 against the ground truth (``point_miou_oracle``, SAM's "oracle").
* Masks are compared at the image's **original** resolution: the decoder's S/4 logits are upsampled to S,
  cropped to the resized image and resized to the original size, then thresholded at logit 0 — what
  ``Sam.postprocess_masks`` and ``SamPredictor`` do.
* **Box-fill floor**: the mask that fills the prompt box (pixels whose centre lies in the box), scored like a
  model's box-prompted mask (score 1.0 for AP): what a box prompt gives with no model at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from bench import BenchError

from .metrics import coco_mask_ap, encode_rle, mask_iou, mean_iou
from .prompts import center_point, resize_longest, sam_input, transform_boxes, transform_coords

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .data import Scene

CHUNK = 16  # prompts decoded and post-processed together (bounds the (n, 3, H, W) logits in memory)


@dataclass
class EvalInstance:
    rle: dict  # pycocotools RLE of the mask at original resolution (bytes counts)
    box: tuple[float, float, float, float]  # xyxy, original pixels
    point: tuple[float, float] | None  # centre point (x, y), original pixels; None for crowd regions
    category_id: int
    ann_id: int
    iscrowd: bool


@dataclass
class EvalImage:
    """An evaluation image, kept compact: the image resized to the input frame (uint8), RLE masks."""

    resized: np.ndarray | None  # (nh, nw, 3) uint8, longest side S; None: read from ``path`` when needed
    hw: tuple[int, int]  # original (H, W)
    image_id: int
    source: str
    instances: list[EvalInstance] = field(default_factory=list)
    path: str | None = None  # the image file (full tier: images are read one at a time)

    def pixels(self, img_size: int) -> np.ndarray:
        from .prompts import resize_image

        if self.resized is not None:
            return self.resized
        from PIL import Image

        with Image.open(self.path) as im:
            image = np.asarray(im.convert("RGB"))
        if image.shape[:2] != tuple(self.hw):
            raise BenchError(f"image {self.path} is {image.shape[0]}x{image.shape[1]} (h x w); its annotation says "
                             f"{self.hw[0]}x{self.hw[1]}")
        return resize_image(image, img_size)


def prepare(scenes: Iterable[Scene], img_size: int) -> list[EvalImage]:
    """Scenes -> `EvalImage`s (prompts computed at original resolution, then transformed by the protocol)."""
    from pycocotools import mask as mask_utils

    from .prompts import resize_image

    out = []
    for sc in scenes:
        insts = []
        for inst in sc.instances:
            m = np.asarray(inst.mask, bool)
            point = None if inst.iscrowd or not m.any() else center_point(m)
            insts.append(EvalInstance(mask_utils.encode(np.asfortranarray(m.astype(np.uint8))),
                                      tuple(float(v) for v in inst.box), point, int(inst.category_id),
                                      int(inst.ann_id), bool(inst.iscrowd)))
        out.append(EvalImage(resize_image(sc.image, img_size), tuple(sc.image.shape[:2]), int(sc.image_id),
                             sc.source, insts))
    return out


def scenes_to_coco(images: Sequence[EvalImage]) -> dict:
    """A COCO instances dict (images, annotations with RLE segmentations, categories) of ``images``, for
    COCOeval on scenes that come without one (generated scenes, the panoptic sample)."""
    from pycocotools import mask as mask_utils

    imgs, anns, cats = [], [], set()
    for im in images:
        imgs.append({"id": im.image_id, "height": im.hw[0], "width": im.hw[1]})
        for inst in im.instances:
            x1, y1, x2, y2 = inst.box
            anns.append({"id": len(anns) + 1, "image_id": im.image_id, "category_id": inst.category_id,
                         "segmentation": {"size": list(inst.rle["size"]), "counts": inst.rle["counts"].decode("ascii")},
                         "area": float(mask_utils.area(inst.rle)), "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "iscrowd": int(inst.iscrowd)})
            cats.add(inst.category_id)
    return {"images": imgs, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in sorted(cats)]}


def _decode(rle: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode(rle).astype(bool)


def _postprocess(model: nn.Module, low: torch.Tensor, resized_hw: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """(n, K, S/4, S/4) logits -> (n, K, H, W) logits at original resolution (``Sam.postprocess_masks``)."""
    import torch.nn.functional as F

    s = model.img_size
    up = F.interpolate(low, (s, s), mode="bilinear", align_corners=False)
    up = up[..., : resized_hw[0], : resized_hw[1]]
    return F.interpolate(up, hw, mode="bilinear", align_corners=False)


@dataclass
class Prompted:
    """One prompt's outcome: the IoU of each of the K masks with the ground truth, the predicted IoUs, the
    kept (most confident) mask's RLE, and what AP needs."""

    ious: np.ndarray  # (K,)
    pred_iou: np.ndarray  # (K,)
    kept: int
    rle: dict | None
    image_id: int
    category_id: int
    score: float


def run(model: nn.Module, images: Sequence[EvalImage], mode: str, *, device: Any = None,
        boxes: dict[int, list[dict]] | None = None, keep_rle: bool = False) -> list[Prompted]:
    """Prompt every non-crowd instance of ``images`` by its box (``mode="box"``) or centre point (``"point"``),
    or (``boxes``: image id -> detections ``{"bbox": xywh, "category_id", "score"}``) every detection box.
    With detections the outcomes carry no IoUs (there is no matching ground truth); ``keep_rle`` keeps the
    kept masks' RLE for AP."""
    import torch

    from .model import Prompts

    if mode not in ("box", "point"):
        raise BenchError(f"unknown prompt mode {mode!r}; valid: box, point")
    model.eval()
    device = device or next(model.parameters()).device
    s = model.img_size
    out: list[Prompted] = []
    with torch.inference_mode():
        for im in images:
            if boxes is not None:
                dets = boxes.get(im.image_id, [])
                items = [(None, (d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]),
                          int(d["category_id"]), float(d["score"])) for d in dets]
            else:
                items = [(inst, inst.box if mode == "box" else inst.point, inst.category_id, None)
                         for inst in im.instances if not inst.iscrowd]
            if not items:
                continue
            x = torch.from_numpy(sam_input(im.pixels(s), s))[None].to(device)
            emb = model.embed(x)
            resized_hw = resize_longest(im.hw[0], im.hw[1], s)
            for start in range(0, len(items), CHUNK):
                chunk = items[start:start + CHUNK]
                geo = np.asarray([c[1] for c in chunk], np.float64)
                if mode == "box":
                    t = torch.as_tensor(transform_boxes(geo, im.hw, s), dtype=torch.float32, device=device)
                    prompts = Prompts(boxes=t[None])
                else:
                    t = torch.as_tensor(transform_coords(geo, im.hw, s), dtype=torch.float32, device=device)
                    prompts = Prompts(points=t[None, :, None, :],
                                      labels=torch.ones(1, len(chunk), 1, dtype=torch.long, device=device))
                dec = model.decode(emb, prompts, multimask=True)
                logits = _postprocess(model, dec.masks[0].float(), resized_hw, im.hw).cpu()
                pred = dec.iou[0].float().cpu().numpy()
                binary = (logits > 0).numpy()
                for j, (inst, _, cat, det_score) in enumerate(chunk):
                    kept = int(np.argmax(pred[j]))
                    if inst is not None:
                        gt = _decode(inst.rle)
                        ious = np.asarray([mask_iou(binary[j, k], gt) for k in range(binary.shape[1])])
                    else:
                        ious = np.full(binary.shape[1], np.nan)
                    rle = encode_rle(binary[j, kept]) if keep_rle else None
                    score = float(pred[j, kept]) if det_score is None else det_score
                    out.append(Prompted(ious, pred[j], kept, rle, im.image_id, cat, score))
    return out


def box_fill(images: Sequence[EvalImage]) -> list[Prompted]:
    """The box-fill floor: each non-crowd instance's box filled (pixel centres inside the box), score 1."""
    out = []
    for im in images:
        h, w = im.hw
        xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5
        for inst in im.instances:
            if inst.iscrowd:
                continue
            x1, y1, x2, y2 = inst.box
            fill = ((ys >= y1) & (ys <= y2))[:, None] & ((xs >= x1) & (xs <= x2))[None, :]
            iou = mask_iou(fill, _decode(inst.rle))
            out.append(Prompted(np.asarray([iou]), np.asarray([1.0]), 0, encode_rle(fill), im.image_id,
                                inst.category_id, 1.0))
    return out


def miou(results: Sequence[Prompted], oracle: bool = False) -> float:
    """Mean IoU of the kept masks (or, ``oracle``, of the best of the K masks per prompt)."""
    return mean_iou([float(r.ious.max() if oracle else r.ious[r.kept]) for r in results])


def mask_ap(gt: dict, results: Sequence[Prompted]) -> dict[str, float]:
    """COCO mask AP of the kept masks (``coco_mask_ap``: AP, AP50, AP75, APs, APm, APl)."""
    preds = [{"image_id": r.image_id, "category_id": r.category_id, "segmentation": r.rle, "score": r.score}
             for r in results]
    return coco_mask_ap(gt, preds)
