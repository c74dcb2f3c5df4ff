"""COCO files for text-to-image FID: the COCO-30k caption list, val2014 image paths, and the protocol's
image preprocessing.

* Captions: ``MS-COCO_val2014_30k_captions.csv`` (shared/data/coco_captions; siliconflow/odeval's copy of
  the 30k list boomb0om/text2image-benchmark publishes): a header ``image_id,text``, then 30,000 rows, one
  caption per distinct val2014 image id. 97 captions contain a quoted newline and 3,337 end in spaces, so
  the file is read with a CSV parser and captions are kept byte for byte.
* Real images: ``<root>/val2014/COCO_val2014_<id:012d>.jpg`` of a local COCO root (not in shared/data).
* Preprocessing (DMD2's evaluation, tianweiy/DMD2 @ 8d8fa55 ``main/coco_eval/coco_evaluator.py``, from
  GigaGAN's code): generated and real images alike are centre-cropped to a square of side min(w, h)
  (``CenterCropLongEdge`` = ``torchvision.transforms.functional.center_crop(img, min(img.size))``) and
  resized to ``eval_res`` x ``eval_res`` with PIL's Lanczos filter (``eval_res`` 256 for SD1.5, 512 in
  their SDXL runs); clean-fid's "clean" mode then resizes to 299 for the Inception network
  (``fid.features``). Real images are loaded as RGB first (clean-fid's ``Image.open(path).convert("RGB")``).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bench import BenchError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

CAPTIONS_FILE = Path("coco_captions") / "MS-COCO_val2014_30k_captions.csv"  # under the data root
CAPTIONS_MD5 = "d8d0518c1df94be6593b7752db71ef6e"  # shared/data/SOURCES.md
HEADER = ["image_id", "text"]
EVAL_RES = 256  # DMD2's --eval_res default (main/test_folder_sd.py) and its SD1.5 README command


def load_captions(path: str | os.PathLike) -> list[tuple[int, str]]:
    """``[(image_id, caption), ...]`` in file order from a CSV with header ``image_id,text``.

    Captions are kept exactly (quoted newlines, trailing spaces). Anything else — a missing or empty file,
    another header, a JSONL file, a row without exactly two fields, an id that is not a non-negative integer,
    an empty caption, broken quoting — raises BenchError naming the file and line and what is valid."""
    path = Path(path)
    valid = (f"expected a CSV file whose first line is the header {','.join(HEADER)} followed by rows "
             "<integer image id>,<caption> (captions with commas, quotes or newlines in double quotes), "
             "e.g. the COCO-30k list at <data root>/" + CAPTIONS_FILE.as_posix())
    if not path.is_file():
        raise BenchError(f"{path}: caption file not found; {valid}")
    rows: list[tuple[int, str]] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            line = 1  # where the next record starts
            header = next(reader, None)
            if header is None:
                raise BenchError(f"{path}: the file is empty; {valid}")
            if header != HEADER:
                shown = ",".join(header)[:80]
                hint = " (this looks like JSON lines, not CSV)" if shown.lstrip().startswith("{") else ""
                raise BenchError(f"{path}, line 1: header is {shown!r}{hint}; {valid}")
            line = reader.line_num + 1
            for row in reader:
                if len(row) != 2:
                    raise BenchError(f"{path}, line {line}: {len(row)} field(s) {row!r:.80}; {valid}")
                image_id, text = row
                if not (image_id.isascii() and image_id.isdigit()):
                    raise BenchError(f"{path}, line {line}: image id {image_id!r:.40} is not a non-negative "
                                     f"integer; {valid}")
                if not text.strip():
                    raise BenchError(f"{path}, line {line}: empty caption for image {image_id}; {valid}")
                rows.append((int(image_id), text))
                line = reader.line_num + 1
    except csv.Error as exc:
        raise BenchError(f"{path}, line {line}: malformed CSV ({exc}); {valid}") from None
    except UnicodeDecodeError as exc:
        raise BenchError(f"{path}: not UTF-8 text ({exc}); {valid}") from None
    if not rows:
        raise BenchError(f"{path}: a header but no caption rows; {valid}")
    return rows


def val2014_image_path(root: str | os.PathLike, image_id: int) -> Path:
    """``<root>/val2014/COCO_val2014_<id:012d>.jpg`` (``root`` may also be the val2014 folder itself)."""
    root = Path(root)
    name = f"COCO_val2014_{int(image_id):012d}.jpg"
    candidates = [root / "val2014" / name, root / name]
    for c in candidates:
        if c.is_file():
            return c
    raise BenchError(f"COCO val2014 image {image_id} not found; looked for {' and '.join(map(str, candidates))} "
                     "(expected a COCO root holding val2014/COCO_val2014_<12-digit id>.jpg, as "
                     "images.cocodataset.org/zips/val2014.zip unpacks)")


def center_crop_resize(img: Image.Image, size: int = EVAL_RES) -> Image.Image:
    """DMD2's evaluation transform: the centred square of side min(w, h), resized to size x size with
    Lanczos. Offsets are torchvision's ``center_crop``: ``int(round((w - side) / 2))`` (Python's round,
    half to even), likewise for the top. Non-RGB images are converted to RGB first."""
    from PIL import Image

    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = int(round((w - side) / 2.0)), int(round((h - side) / 2.0))
    img = img.crop((left, top, left + side, top + side))
    return img.resize((size, size), Image.LANCZOS)


def val2014_images(root: str | os.PathLike, image_ids: Sequence[int], size: int = EVAL_RES) -> np.ndarray:
    """uint8 [N, size, size, 3]: the given val2014 images through ``center_crop_resize``, in order."""
    import numpy as np
    from PIL import Image

    from bench import progress

    out = np.empty((len(image_ids), size, size, 3), dtype=np.uint8)
    with progress.bar(f"Reading {len(image_ids)} COCO val2014 images", len(image_ids)) as update:
        for i, image_id in enumerate(image_ids):
            path = val2014_image_path(root, image_id)
            try:
                with Image.open(path) as im:
                    out[i] = np.asarray(center_crop_resize(im, size))
            except OSError as exc:
                raise BenchError(f"{path}: cannot read the image ({exc})") from None
            if i % 256 == 255 or i == len(image_ids) - 1:
                update(i + 1, "")
    return out
