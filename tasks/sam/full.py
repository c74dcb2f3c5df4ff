"""The full tier of the ``sam`` task: COCO val2017 (and LVIS v1 val), official SAM checkpoints, students built
from code, distillation on a local SA-1B subset or COCO train2017.

* **Teacher**: an official SAM checkpoint file (``sam.teacher_checkpoint``: ``sam_vit_h_4b8939.pth`` of
  facebookresearch/segment-anything, or the vit_l / vit_b files, ``sam.teacher_arch``), read with
  ``torch.load(weights_only=True)`` (`tasks.imagenet.models.read_state_dict`) into `model.PromptableSAM` built
  from ``segment_anything/build_sam.py``'s configuration, whose parameter names are those of
  ``segment_anything.Sam``. The key check is strict: a missing, unexpected or differently shaped tensor is a
  `BenchError` that names the first few.
* **Students**: MobileSAM's TinyViT-5M image encoder (Zhang et al. 2023, ``mobile_sam/build_sam.py`` vit_t) with
  SAM's prompt encoder and decoder, initialised from code; or SAM ViT-B (``student_arch=vit_b``) from the official
  ViT-B checkpoint (``base_checkpoint``), the starting point of SlimSAM (Chen et al. 2024).
* **Evaluation**: ``coco_root/val2017`` + ``annotations/instances_val2017.json`` (SAM §7.4, TinySAM's
  ``eval/tinysam_zero_shot_ins_eval.py``). Box prompts are the ground-truth boxes; with ``boxes_json`` (TinySAM's
  ``coco_instances_results_vitdet.json``: ``[{"image_id", "category_id", "bbox": xywh, "score"}]``) the AP is that
  of the masks for the detector's boxes with the detector's category and score kept, as in TinySAM's script
  (``box_miou`` stays the ground-truth-box mIoU: detections have no matched mask). LVIS v1 val
  (``lvis_json``; images found under ``coco_root`` by the split folder of their ``coco_url``): box-prompt mIoU
  and LVISEval mask AP (needs the ``lvis`` package). Point prompts on COCO val2017 (SAM's 23 point datasets are
  not bundled: state which data a point number comes from).
* **Distillation data** (``train_images``): an SA-1B subset (``sa_<id>.jpg`` with ``sa_<id>.json`` beside it,
  MobileSAM and TinySAM distil on 1 % of SA-1B) or COCO train2017 with ``train_annotations``; per image P
  non-crowd masks are drawn by index (deterministic), decoded and resized to the input frame.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench import BenchError

if TYPE_CHECKING:
    from torch import nn

    from . import Sam
    from .protocol import EvalImage

VAL_ANNOTATIONS = "annotations/instances_val2017.json"


def check_inputs(task: Sam) -> None:
    """Bad full-tier inputs stop the run before any cell (exit 2): a COCO root without its annotations or
    images, a checkpoint that is unreadable or does not fit its architecture."""
    p = task.params
    if p.coco_root:
        root = Path(p.coco_root).expanduser()
        for need in (VAL_ANNOTATIONS, "val2017"):
            if not (root / need).exists():
                raise BenchError(f"sam.coco_root {str(root)!r} has no {need} (expected the COCO 2017 layout: "
                                 f"val2017/*.jpg and {VAL_ANNOTATIONS})")
    teacher, student = task._configs()
    if p.teacher_checkpoint:
        probe_sam_checkpoint(p.teacher_checkpoint, teacher, "sam.teacher_checkpoint")
    if p.base_checkpoint:
        probe_sam_checkpoint(p.base_checkpoint, student, "sam.base_checkpoint")


def unavailable(p: Any) -> str | None:
    """Why the full tier cannot run with params ``p``, or None."""
    if not p.coco_root:
        return "the sam full tier needs sam.coco_root (a COCO root with val2017/ and " + VAL_ANNOTATIONS + ")"
    if not p.teacher_checkpoint:
        return ("the sam full tier needs sam.teacher_checkpoint: an official SAM checkpoint file (e.g. "
                "sam_vit_h_4b8939.pth, with sam.teacher_arch=vit_h)")
    if not p.train_images:
        return "the sam full tier needs sam.train_images: a folder of distillation images (SA-1B subset or COCO train2017)"
    return None


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def _mismatch(own: dict[str, tuple[int, ...]], state: dict[str, Any], path: str | Path, what: str, cfg: Any) -> None:
    """A `BenchError` naming the first missing / unexpected / differently shaped keys, if there are any."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k]) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k])}" for k in wrong[:3]]
        raise BenchError(f"{what}: {str(path)!r} does not fit the SAM architecture ({cfg.encoder}, img_size "
                         f"{cfg.img_size}; official checkpoints are 1024 px): {len(missing)} missing keys "
                         f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}, {len(wrong)} of another "
                         f"shape {shapes}")


def _unwrap(state: Any, path: str | Path, what: str) -> dict[str, Any]:
    import torch

    for key in ("model", "state_dict"):  # common checkpoint envelopes
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BenchError(f"{what}: {str(path)!r} does not hold a state dict of tensors (an official SAM checkpoint)")
    return state


def probe_sam_checkpoint(path: str | Path, cfg: Any, what: str) -> None:
    """Check, before any cell runs, that ``path`` is a readable checkpoint whose keys and shapes fit ``cfg``:
    tensors are memory-mapped (``torch.load(mmap=True, weights_only=True)``), so nothing is read but the index."""
    import torch

    from .model import build_sam

    p = Path(path).expanduser()
    if not p.is_file():
        raise BenchError(f"{what}: checkpoint {str(p)!r} is not a file (an official SAM .pth)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a zip-format checkpoint (legacy torch.save): read it whole
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise BenchError(f"{what}: cannot read {str(p)!r} as a torch checkpoint with weights_only=True "
                             f"({type(exc).__name__}: {exc})") from exc
    state = _unwrap(state, p, what)
    with torch.device("meta"):
        own = {k: tuple(v.shape) for k, v in build_sam(cfg.model_copy(update={"pretrained": False})).state_dict().items()}
    _mismatch(own, state, p, what, cfg)


def load_sam_checkpoint(model: nn.Module, path: str | Path, what: str) -> dict[str, Any]:
    """Load an official SAM checkpoint (a state dict in ``segment_anything.Sam``'s key layout) into ``model``
    with ``weights_only=True`` (`tasks.imagenet.models.read_state_dict`) and a strict key check; returns facts
    for the record."""
    from ..imagenet.models import read_state_dict

    t0 = time.perf_counter()
    state = _unwrap(read_state_dict(path, what), path, what)
    _mismatch({k: tuple(v.shape) for k, v in model.state_dict().items()}, state, path, what, model.config)
    model.load_state_dict(state, strict=True)
    return {"weights": str(path), "size_bytes": Path(path).expanduser().stat().st_size, "tensors": len(state),
            "load_s": round(time.perf_counter() - t0, 2)}


# --------------------------------------------------------------------------------------------------
# COCO / LVIS evaluation images
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise BenchError(f"{path} not found; expected {what}") from None
    except (OSError, ValueError) as exc:
        raise BenchError(f"{path} is not readable JSON ({exc}); expected {what}") from None


def coco_eval_images(gt: dict, image_path, img_size: int, limit: int | None, points: bool) -> list[EvalImage]:
    """`EvalImage`s of a COCO-format dict (images read lazily from ``image_path(image_entry)``); centre points
    only when ``points`` (they need a distance transform per instance)."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    from .prompts import center_point
    from .protocol import EvalImage, EvalInstance, _decode

    coco = COCO()
    coco.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    images = sorted(gt["images"], key=lambda im: im["id"])[: limit or None]
    out = []
    for im in images:
        insts = []
        for ann in sorted(coco.imgToAnns.get(im["id"], []), key=lambda a: a["id"]):
            rle = coco.annToRLE(ann)
            if isinstance(rle.get("counts"), str):
                rle = {**rle, "counts": rle["counts"].encode("ascii")}
            crowd = bool(ann.get("iscrowd", 0))
            x, y, w, h = (float(v) for v in ann["bbox"])
            point = center_point(_decode(rle)) if points and not crowd else None
            insts.append(EvalInstance(rle, (x, y, x + w, y + h), point, int(ann["category_id"]), int(ann["id"]), crowd))
        out.append(EvalImage(None, (int(im["height"]), int(im["width"])), int(im["id"]), "coco_val2017", insts,
                             path=str(image_path(im))))
    return out


class FullTier:
    """What the task delegates at the full tier."""

    def __init__(self, task: Sam) -> None:
        self.task = task
        self.p = task.params
        self.root = Path(self.p.coco_root).expanduser() if self.p.coco_root else None

    # --- models --------------------------------------------------------------------------------------
    def configs(self):
        from .model import SamConfig

        s = self.p.img_size
        teacher = SamConfig.sam(self.p.teacher_arch).model_copy(update={"img_size": s})
        student = (SamConfig.tinyvit_5m(s) if self.p.student_arch == "tinyvit_5m"
                   else SamConfig.sam("vit_b").model_copy(update={"img_size": s}))
        return teacher, student

    def teacher(self, spec) -> tuple[nn.Module, dict[str, Any]]:
        from .model import build_sam, count_params

        model = build_sam(spec.config, seed=0)
        facts = load_sam_checkpoint(model, spec.checkpoint, spec.checkpoint_field)
        return model, {"name": spec.name, "arch": spec.name.removeprefix("sam_"), "trained_by": "provided",
                       "n_params": count_params(model), "description": spec.description, **facts}

    def init_student(self, model: nn.Module) -> None:
        if self.p.base_checkpoint:
            load_sam_checkpoint(model, self.p.base_checkpoint, "sam.base_checkpoint")

    # --- evaluation ----------------------------------------------------------------------------------
    def _gt(self) -> dict:
        gt = _read_json(self.root / VAL_ANNOTATIONS, "COCO instances annotations (images, annotations, categories)")
        missing = [k for k in ("images", "annotations", "categories") if k not in gt]
        if missing:
            raise BenchError(f"{self.root / VAL_ANNOTATIONS} lacks {missing}; expected a COCO instances file")
        if self.p.eval_images:
            keep = {im["id"] for im in sorted(gt["images"], key=lambda im: im["id"])[: self.p.eval_images]}
            gt = {**gt, "images": [im for im in gt["images"] if im["id"] in keep],
                  "annotations": [a for a in gt["annotations"] if a["image_id"] in keep]}
        return gt

    def eval_sets(self) -> dict[str, Any]:
        gt = self._gt()
        images = coco_eval_images(gt, lambda im: self.root / "val2017" / im["file_name"], self.p.img_size, None,
                                  points=self.task.env.subtask == "point")
        return {"main": (images, gt)}

    def detections(self) -> dict[int, list[dict]]:
        dets = _read_json(Path(self.p.boxes_json).expanduser(), "a detections list [{image_id, category_id, bbox, score}]")
        if not isinstance(dets, list):
            raise BenchError(f"sam.boxes_json {self.p.boxes_json!r} holds a {type(dets).__name__}; expected a list of "
                             f"detections (TinySAM's coco_instances_results_vitdet.json)")
        out: dict[int, list[dict]] = {}
        for i, d in enumerate(dets):
            if not all(k in d for k in ("image_id", "category_id", "bbox", "score")) or len(d["bbox"]) != 4:
                raise BenchError(f"sam.boxes_json: detection {i} needs image_id, category_id, bbox [x, y, w, h], score")
            out.setdefault(int(d["image_id"]), []).append(d)
        return out

    def lvis(self, model: nn.Module) -> dict[str, float]:
        """LVIS v1 val: box-prompt mIoU and LVISEval mask AP (the ``lvis`` package)."""
        from . import protocol
        from .metrics import encode_rle  # noqa: F401 - the RLE format LVIS results take

        try:
            from lvis import LVIS, LVISEval, LVISResults
        except ImportError as exc:
            raise BenchError("sam.lvis_json needs the lvis package (pip install lvis) for LVISEval") from exc
        gt = _read_json(Path(self.p.lvis_json).expanduser(), "LVIS v1 annotations")

        def path(im: dict) -> Path:
            split, name = im["coco_url"].split("/")[-2:]
            return self.root / split / name

        images = coco_eval_images({**gt, "annotations": [{**a, "iscrowd": 0} for a in gt["annotations"]]}, path,
                                  self.p.img_size, self.p.eval_images, points=False)
        res = protocol.run(model, images, "box", keep_rle=True)
        preds = [{"image_id": r.image_id, "category_id": r.category_id, "segmentation": r.rle, "score": r.score}
                 for r in res]
        lvis_gt = LVIS(self.p.lvis_json)
        ev = LVISEval(lvis_gt, LVISResults(lvis_gt, preds), "segm")
        ev.params.img_ids = [im.image_id for im in images]
        ev.run()
        return {"lvis_box_miou": protocol.miou(res), "lvis_mask_ap": float(ev.get_results()["AP"])}

    # --- training data -------------------------------------------------------------------------------
    def _train_items(self) -> tuple[list[Path], dict[str, list[dict]] | None]:
        folder = Path(self.p.train_images).expanduser()
        if not folder.is_dir():
            raise BenchError(f"sam.train_images {str(folder)!r} is not a folder of images")
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if self.p.train_annotations:
            ann = _read_json(Path(self.p.train_annotations).expanduser(), "COCO instances annotations")
            by_name = {im["file_name"]: im["id"] for im in ann.get("images", [])}
            per: dict[int, list[dict]] = {}
            for a in ann.get("annotations", []):
                per.setdefault(a["image_id"], []).append(a)
            files = [f for f in files if by_name.get(f.name) in per]
            table = {f.name: per[by_name[f.name]] for f in files}
        else:
            files = [f for f in files if f.with_suffix(".json").is_file()]
            table = None
        if not files:
            raise BenchError(f"sam.train_images {str(folder)!r}: no image with annotations (SA-1B: sa_<id>.jpg + "
                             f"sa_<id>.json; COCO: give sam.train_annotations)")
        if self.p.train_size:
            files = files[: self.p.train_size]
        return files, table

    def train_split(self):
        from .batches import SceneSplit

        files, table = self._train_items()
        src = "COCO-format annotations " + str(self.p.train_annotations) if table is not None else "SA-1B json per image"
        self._n_train = len(files)
        return SceneSplit(len(files), lambda i: self._train_scene(files[i], table, i), img_size=self.p.img_size,
                          prompts=self.task.prompts, seed=13, description=f"{self.p.train_images} ({src})",
                          cache_bytes=0)

    def _train_scene(self, path: Path, table, index: int):
        """A scene with only the P annotations this example prompts (drawn by index), decoded."""
        from PIL import Image
        from pycocotools import mask as mask_utils

        from .data import Instance, Scene

        anns = table[path.name] if table is not None else _read_json(path.with_suffix(".json"), "SA-1B annotations")
        if isinstance(anns, dict):
            anns = anns.get("annotations", [])
        anns = [a for a in anns if not a.get("iscrowd", 0)]
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
        h, w = image.shape[:2]
        rng = np.random.default_rng([14, index])
        chosen = sorted(rng.choice(len(anns), size=min(self.task.prompts, len(anns)), replace=False)) if anns else []
        insts = []
        for j in chosen:
            seg = anns[j]["segmentation"]
            if isinstance(seg, list):  # COCO polygons
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
            elif isinstance(seg.get("counts"), list):  # uncompressed RLE
                rle = mask_utils.frPyObjects(seg, h, w)
            else:
                rle = seg
            x, y, bw, bh = (float(v) for v in anns[j]["bbox"])
            insts.append(Instance(mask_utils.decode(rle).astype(bool), (x, y, x + bw, y + bh),
                                  int(anns[j].get("category_id", 1)), int(anns[j].get("id", j)), False))
        return Scene(image, insts, index, path.name, "train_images")

    def training(self, optim):
        from bench.api import TrainConfig

        n = getattr(self, "_n_train", None) or len(self._train_items()[0])
        steps = max(1, math.ceil(self.p.epochs * n / self.p.batch_size))
        return TrainConfig(steps=steps, batch_size=self.p.batch_size, eval_batch_size=1, optim=optim)

    # --- provenance ----------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        h = hashlib.sha256()
        with open(self.root / VAL_ANNOTATIONS, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        ev = {"coco_val2017": {"annotations_sha256": h.hexdigest(), "images_used": self.p.eval_images or "all"}}
        if self.p.boxes_json:
            ev["boxes_json"] = self.p.boxes_json
        if self.p.lvis_json:
            ev["lvis_json"] = self.p.lvis_json
        return {"source": f"COCO val2017 at {self.root}", "image_size": self.p.img_size, "eval": ev}

    def notes(self) -> list[str]:
        out = [f"full tier: official SAM {self.p.teacher_arch} teacher; student {self.p.student_arch} built from code"]
        if self.task.env.subtask == "box":
            out.append("mask AP with " + ("ViTDet detections (sam.boxes_json), detector scores kept" if self.p.boxes_json
                                          else "ground-truth boxes (SAM's Table 5 uses ViTDet-H detections: set "
                                               "sam.boxes_json to compare with published AP)"))
        else:
            out.append("point mIoU on COCO val2017 instances (not SAM's 23-dataset average)")
        return out
