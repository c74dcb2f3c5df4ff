"""Images of the imagenet family: where they come from at each tier, and the one pipeline they go through.

Every split yields batches ``{"pixels": float [B, 3, H, W] in [0, 1], "labels": long [B], "index": long
[B]}``; normalisation is the model's (`nets.ImageClassifier`).

* **ImageFolder roots** (full tier, and the small tier's CIFAR-10 once extracted): ``<root>/<split>/<class>/
  <image>``. Class indices follow the standard order: when every class folder is an ImageNet-1k WordNet id,
  the index is its position in the sorted list of the 1,000 ids (timm's ``imagenet_synsets.txt``, the order
  of torchvision's ``ImageFolder`` on the full ILSVRC-2012 tree and of the Hugging Face dataset), so a root
  holding a subset of the classes still scores a 1,000-way model correctly; otherwise classes are the sorted
  folder names (CIFAR-10's folder names sort into its own label order: airplane ... truck).
* **Preprocessing** is timm's, per model: evaluation resizes the short side to ``floor(size / crop_pct)``
  with the model's interpolation and centre-crops ``size`` (``timm.data.create_transform(is_training=
  False)``, as timm's ``validate.py``); training at the full tier uses timm's RandomResizedCrop(0.08-1) +
  horizontal flip at the student's size. The small and smoke tiers do not augment (their budgets are about
  an epoch), so a teacher's output for an example is fixed and the harness caches it.
* The small tier decodes CIFAR-10 once into a uint8 array cached by content hash; the full tier decodes on
  demand (files are read in threads; random transforms run in order on the main thread, so a resumed run
  draws the same crops).
* **smoke**: generated images, deterministic: each class is an oriented grating on a colour it shares with
  one other class, with random phase, contrast and strong noise.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import BenchError

if TYPE_CHECKING:
    import numpy as np
    import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
CIFAR_ZIP = Path("cifar10") / "cifar10_jpeg.zip"
CIFAR_MD5 = "649a721f144b44405e62ed433227ce29"  # shared/data/SOURCES.md


@lru_cache(maxsize=1)
def imagenet_synsets() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k WordNet ids in the standard (sorted) class order."""
    from timm.data import ImageNetInfo

    ids = tuple(ImageNetInfo("imagenet-1k").label_names())
    assert list(ids) == sorted(ids) and len(ids) == 1000
    return ids


def class_space(folders: Sequence[str]) -> tuple[str, ...]:
    """Class names in index order for a root whose class folders are ``folders`` (see the module doc)."""
    synsets = imagenet_synsets()
    if folders and set(folders) <= set(synsets):
        return synsets
    return tuple(sorted(folders))


# --------------------------------------------------------------------------------------------------
# ImageFolder roots
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderIndex:
    """The images of one split of an ImageFolder root, with labels in the class space's order."""

    root: Path
    split: str
    files: tuple[str, ...]  # relative to root/split, sorted
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f, y in zip(self.files, self.labels):
            h.update(f"{f}\t{y}\t{(self.root / self.split / f).stat().st_size}\n".encode())
        return h.hexdigest()


def scan(root: Path, split: str, classes: Sequence[str] | None = None) -> FolderIndex:
    """List ``root/split/<class>/<image>``; a clear error for anything that is not that layout."""
    base = Path(root) / split
    if not base.is_dir():
        present = sorted(p.name for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
        raise BenchError(f"ImageFolder root {str(root)!r} has no {split}/ folder (found: {present or 'nothing'}); "
                         f"expected {root}/{split}/<class or WordNet id>/<image>")
    folders = sorted(p.name for p in base.iterdir() if p.is_dir())
    if not folders:
        raise BenchError(f"{base} has no class folders; expected {base}/<class or WordNet id>/<image>")
    space = tuple(classes) if classes is not None else class_space(folders)
    position = {c: i for i, c in enumerate(space)}
    unknown = [f for f in folders if f not in position]
    if unknown:
        raise BenchError(f"{base}: class folders {unknown[:5]} are not in the training classes ({len(space)} classes)")
    files, labels = [], []
    for folder in folders:
        for dirpath, _, names in os.walk(base / folder):
            for name in sorted(names):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(str(Path(dirpath, name).relative_to(base)))
                    labels.append(position[folder])
    if not files:
        raise BenchError(f"{base} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    order = sorted(range(len(files)), key=lambda i: files[i])
    return FolderIndex(Path(root), split, tuple(files[i] for i in order), tuple(labels[i] for i in order), space)


def eval_transform(data_config: dict[str, Any]):
    """timm's evaluation preprocessing for a model's data config, without normalisation (the model's own)."""
    from timm.data import create_transform

    return create_transform(tuple(data_config["input_size"]), is_training=False,
                            interpolation=data_config.get("interpolation", "bilinear"),
                            crop_pct=data_config.get("crop_pct", 0.875), crop_mode=data_config.get("crop_mode", "center"),
                            mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def train_transform(data_config: dict[str, Any]):
    """timm's RandomResizedCrop(0.08-1) + horizontal flip at the model's size, nothing else, no normalisation."""
    from timm.data import create_transform

    return create_transform(tuple(data_config["input_size"]), is_training=True,
                            interpolation=data_config.get("interpolation", "bilinear"), hflip=0.5,
                            auto_augment=None, color_jitter=None, re_prob=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def transform_key(data_config: dict[str, Any], training: bool) -> str:
    keys = ("input_size", "interpolation", "crop_pct", "crop_mode")
    return json.dumps({"train": training, **{k: data_config.get(k) for k in keys}}, sort_keys=True, default=list)


def _open(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


class FolderSplit:
    """Images decoded from files at every batch (full tier), through a timm transform."""

    def __init__(self, index: FolderIndex, transform, stochastic: bool, threads: int = 8) -> None:
        self.index = index
        self.transform = transform
        self.stochastic = stochastic
        self.threads = threads
        self.labels = list(index.labels)

    def __len__(self) -> int:
        return len(self.index.files)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        import torch

        base = self.index.root / self.index.split
        paths = [base / self.index.files[i] for i in indices]
        with ThreadPoolExecutor(max_workers=min(self.threads, max(1, len(paths)))) as pool:
            images = list(pool.map(_open, paths))
        # Transforms run here, in order: random crops draw from the seeded global RNGs deterministically.
        pixels = torch.stack([self.transform(im) for im in images])
        return {"pixels": pixels, "labels": torch.tensor([self.labels[i] for i in indices], dtype=torch.long),
                "index": torch.tensor(list(indices), dtype=torch.long)}


class ArraySplit:
    """Decoded images held as one uint8 array [N, H, W, 3] (smoke, and the small tier's cache)."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], fingerprint: str) -> None:
        self.images = images
        self.labels = [int(y) for y in labels]
        self.fingerprint = fingerprint
        self.stochastic = False

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        import numpy as np
        import torch

        idx = np.asarray(list(indices), dtype=np.int64)
        pixels = torch.from_numpy(np.ascontiguousarray(self.images[idx])).permute(0, 3, 1, 2).float().div_(255.0)
        return {"pixels": pixels, "labels": torch.tensor([self.labels[i] for i in idx], dtype=torch.long),
                "index": torch.as_tensor(idx)}


def materialize(index: FolderIndex, data_config: dict[str, Any], cache_dir: Path, limit: int | None = None,
                quiet: bool = False) -> ArraySplit:
    """Decode ``index`` through the evaluation transform once; cache the uint8 array by content hash."""
    import numpy as np

    n = len(index.files) if limit is None else min(limit, len(index.files))
    key = hashlib.sha256(f"{index.fingerprint()}|{transform_key(data_config, False)}|{n}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / "imagenet" / "decoded" / f"{index.root.name}-{index.split}-{key}.npy"
    chosen = _subset(len(index.files), n)
    labels = [index.labels[i] for i in chosen]
    if path.exists():
        try:
            return ArraySplit(np.load(path, mmap_mode="r"), labels, key)
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
    from bench import progress

    transform = eval_transform(data_config)
    base = index.root / index.split
    size = tuple(data_config["input_size"][1:])
    out = np.empty((n, *size, 3), dtype=np.uint8)
    with progress.bar(f"Decoding {index.root.name}/{index.split} ({n} images)", n) as update:
        for start in range(0, n, 2048):
            part = chosen[start:start + 2048]
            with ThreadPoolExecutor(max_workers=4) as pool:
                images = list(pool.map(_open, [base / index.files[i] for i in part]))
            for j, im in enumerate(images):
                out[start + j] = (transform(im).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
            update(min(n, start + len(part)), "")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}.npy")
    np.save(tmp, out)
    os.replace(tmp, path)
    return ArraySplit(np.load(path, mmap_mode="r"), labels, key)


def _subset(total: int, n: int) -> list[int]:
    """``n`` of ``total`` examples: all of them, or a fixed class-balanced-in-expectation sample."""
    if n >= total:
        return list(range(total))
    import random

    return sorted(random.Random(20_240_601).sample(range(total), n))


# --------------------------------------------------------------------------------------------------
# The small tier: CIFAR-10 from the shared zip
# --------------------------------------------------------------------------------------------------


def cifar_zip(data_root: Path | None) -> Path | None:
    if data_root is None:
        return None
    path = Path(data_root) / CIFAR_ZIP
    return path if path.is_file() else None


def file_md5(path: Path, chunk: int = 1 << 20) -> str:
    from bench.hashing import file_digest

    return file_digest(path, "md5", chunk)


def extract_cifar(zip_path: Path, cache_dir: Path) -> Path:
    """Extract the CIFAR-10 zip once into the cache (an ImageFolder root with train/ and test/)."""
    md5 = file_md5(zip_path)
    dest = Path(cache_dir) / "imagenet" / f"cifar10-{md5[:12]}"
    if (dest / ".complete").exists():
        return dest
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise BenchError(f"{zip_path}: member {bad!r} is corrupt (expected md5 {CIFAR_MD5})")
            zf.extractall(tmp)
    except zipfile.BadZipFile as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BenchError(f"{zip_path} is not a readable zip ({exc}); expected CIFAR-10 as in SOURCES.md "
                         f"(md5 {CIFAR_MD5})") from exc
    for split in ("train", "test"):
        if not (tmp / split).is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            raise BenchError(f"{zip_path} has no {split}/ folder; expected CIFAR-10 as train/<class>/*.jpg, test/<class>/*.jpg")
    (tmp / ".complete").write_text(md5)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process extracted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------------------------------
# The smoke tier: generated images
# --------------------------------------------------------------------------------------------------

SMOKE_CLASSES = tuple(f"pattern{i}" for i in range(10))


def generate_smoke(n: int, size: int, seed: int, num_classes: int = 10) -> tuple[np.ndarray, list[int]]:
    """``n`` images of ``size`` x ``size``: class ``c`` is a grating at angle 18c degrees on a colour shared by
    classes 2k and 2k+1, with random phase, frequency jitter, contrast and strong pixel noise (deterministic
    in ``seed``)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, c in enumerate(labels):
        angle = math.pi * c / num_classes
        freq = 2.0 + rng.uniform(-0.3, 0.3)
        wave = np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)) + rng.uniform(0, 2 * math.pi))
        hue = 2 * math.pi * (c // 2) / num_classes  # classes share colours in pairs: orientation decides
        colour = 0.5 + 0.25 * np.array([math.cos(hue), math.cos(hue + 2.1), math.cos(hue + 4.2)], dtype=np.float32)
        contrast = rng.uniform(0.1, 0.3)
        img = colour[None, None, :] + contrast * wave[..., None] + rng.normal(0, 0.25, (size, size, 3))
        images[i] = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return images, [int(y) for y in labels]


def array_fingerprint(images: np.ndarray, labels: Sequence[int]) -> str:
    import numpy as np

    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    h.update(",".join(map(str, labels)).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# The full tier from the Hugging Face hub
# --------------------------------------------------------------------------------------------------


class HFSplit:
    """A Hugging Face image-classification split (``image``, ``label``), e.g. ``ILSVRC/imagenet-1k``, whose
    label ids are the standard sorted-WordNet-id order."""

    def __init__(self, dataset, transform, stochastic: bool) -> None:
        self.ds = dataset
        self.transform = transform
        self.stochastic = stochastic
        self.labels = list(dataset["label"])

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        import torch

        rows = self.ds[list(indices)]
        pixels = torch.stack([self.transform(im.convert("RGB")) for im in rows["image"]])
        return {"pixels": pixels, "labels": torch.tensor(rows["label"], dtype=torch.long),
                "index": torch.tensor(list(indices), dtype=torch.long)}


def load_hf(name: str, split: str):
    try:
        from datasets import load_dataset

        return load_dataset(name, split=split)
    except Exception as exc:
        raise BenchError(f"could not load the Hugging Face dataset {name!r} split {split!r} ({type(exc).__name__}: "
                         f"{exc}); offline, point imagenet.root at an ImageFolder tree (train/<wnid>/..., val/<wnid>/...)") from exc
