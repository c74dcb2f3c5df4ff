"""The full tier of coco_fid: zero-shot COCO-2014 FID with a diffusers text-to-image teacher.

* **Evaluation** (the COCO-30k protocol of DMD2 and the papers it compares with): the first ``eval_images``
  captions of the caption list (default the 30,000 of ``<data root>/coco_captions``), one image each at the
  model's resolution; generated images and the val2014 images of the same ids are centre-cropped and resized
  with Lanczos to ``resolution`` (256), then scored by FID/KID in clean-fid's "clean" protocol (`fid.py`). The
  reference statistics are cached by content hash.
* **Distillation data**: COCO train2014 image-caption pairs of the same local root
  (``annotations/captions_train2014.json``, ``train2014/COCO_train2014_<id>.jpg``), one example per caption,
  images centre-cropped and resized to the model's resolution, encoded by the pipeline's VAE (the
  distribution's mean) and the caption by its text encoder, batch by batch. DMD2 trains its SD1.5 student on
  LAION-Aesthetic prompts with COCO-like real images for its GAN; bench uses COCO's own train split so that
  nothing but the named local root is needed (a deviation, stated in every record's notes).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import BenchError

if TYPE_CHECKING:
    import torch

    from ..generative.pipeline import Pipeline


def train_annotations(root: Path) -> Path:
    path = root / "annotations" / "captions_train2014.json"
    if not path.is_file():
        raise BenchError(f"coco_fid.coco_root {str(root)!r} has no annotations/captions_train2014.json (the full "
                         f"tier distils on COCO train2014 image-caption pairs; expected the layout of COCO's "
                         f"annotations_trainval2014.zip and train2014.zip)")
    return path


class CocoTrain:
    """COCO train2014 (image, caption) pairs as a training split of latents and text embeddings."""

    def __init__(self, root: Path, pipeline: Pipeline, resolution: int) -> None:
        self.root = Path(root)
        self.pipeline = pipeline
        self.resolution = resolution
        ann = train_annotations(self.root)
        try:
            data = json.loads(ann.read_text())
            self.pairs = [(int(a["image_id"]), str(a["caption"])) for a in data["annotations"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise BenchError(f"{ann}: not a COCO captions file ({exc}); expected "
                             f'{{"annotations": [{{"image_id": int, "caption": str}}, ...]}}') from None
        if not self.pairs:
            raise BenchError(f"{ann}: no annotations")
        self.fingerprint = hashlib.sha256(ann.read_bytes()).hexdigest()

    def __len__(self) -> int:
        return len(self.pairs)

    def image_path(self, image_id: int) -> Path:
        name = f"COCO_train2014_{image_id:012d}.jpg"
        for c in (self.root / "train2014" / name, self.root / name):
            if c.is_file():
                return c
        raise BenchError(f"COCO train2014 image {image_id} not found under {self.root}/train2014/ ({name})")

    def conditions(self, indices: Sequence[int]) -> torch.Tensor:
        return self.pipeline.encode_prompts([self.pairs[i][1] for i in indices])

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        import numpy as np
        import torch
        from PIL import Image

        from .coco import center_crop_resize

        idx = list(indices)
        images = []
        for i in idx:
            with Image.open(self.image_path(self.pairs[i][0])) as im:
                images.append(np.asarray(center_crop_resize(im, self.resolution)))
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        return {"x0": self.pipeline.encode_images(x.to(self.pipeline.device)).cpu(), "cond": self.conditions(idx),
                "index": torch.as_tensor(idx)}


class FullTier:
    """Evaluation captions, their real val2014 images and the training split of the full tier."""

    def __init__(self, task: Any) -> None:
        self.task = task
        p = task.params
        if not p.coco_root:
            raise BenchError("the coco_fid full tier needs coco_fid.coco_root (a local COCO root with val2014/ and "
                             "annotations/captions_train2014.json + train2014/)")
        self.root = Path(p.coco_root).expanduser()

    @cached_property
    def captions(self) -> list[tuple[int, str]]:
        from .coco import load_captions

        path = self.task.caption_path()
        if path is None:
            raise BenchError("the coco_fid full tier needs the caption list: coco_fid.captions=FILE or a data root "
                             "holding coco_captions/MS-COCO_val2014_30k_captions.csv")
        rows = load_captions(path)
        n = self.task.eval_images
        if n > len(rows):
            raise BenchError(f"coco_fid.eval_images={n} but the caption list {path} has {len(rows)} captions")
        return rows[:n]

    def conditions(self, start: int, stop: int) -> torch.Tensor:
        return self.task.pipeline.encode_prompts([t for _, t in self.captions[start:stop]])

    @cached_property
    def reference(self):
        from . import fid
        from .coco import val2014_image_path, val2014_images

        ids = [i for i, _ in self.captions]
        res = self.task.params.resolution
        h = hashlib.sha256()
        for i in ids:
            path = val2014_image_path(self.root, i)
            h.update(f"{i}:{path.stat().st_size};".encode())
        key = f"coco-val2014:{h.hexdigest()}:res{res}:crop-lanczos"
        folder = self.task.env.cache_dir / self.task.name / "fid"
        return fid.reference_stats(folder, key, lambda: val2014_images(self.root, ids, res),
                                   space_name="inception", device=self.task.env.device)

    def prepare(self, images):
        """Generated images (uint8, the model's resolution) through the protocol's crop + Lanczos resize."""
        import numpy as np
        from PIL import Image

        from .coco import center_crop_resize

        res = self.task.params.resolution
        return np.stack([np.asarray(center_crop_resize(Image.fromarray(im), res)) for im in images])

    def train_split(self) -> CocoTrain:
        return CocoTrain(self.root, self.task.pipeline, self.task.image_size)
