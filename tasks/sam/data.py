"""Scenes of the ``sam`` task family: images with instance masks, from real data or generated.

* **COCO val2017 subset** (``<data root>/coco_val_subset``: ``images/<file_name>`` + ``instances.json``,
  206 images, 1,786 annotations of which 21 are crowd regions stored as uncompressed RLE): masks are
  rasterised by pycocotools (``COCO.annToMask``), the rasteriser COCOeval itself uses, so scoring the ground
  truth as predictions gives AP 1.0. Boxes are the annotations' ``bbox`` as xyxy (the GT-box prompts of
  SAM §7.4 / TinySAM's eval script use boxes in this frame). The raw instances dict is returned too, for
  :func:`~.metrics.coco_mask_ap`.
* **COCO panoptic sample** (``<data root>/coco_sample``, cocodataset/panopticapi's sample data): segment ids
  are ``R + 256 G + 256² B`` of the panoptic PNG (panopticapi's ``rgb2id``); one instance per segment whose
  category is a thing (``isthing`` in ``panoptic_coco_categories.json``); ``iscrowd`` from ``segments_info``.
* **DSB-2018 nuclei** (BBBC038v1, one of SAM's 23 point-prompt datasets, §7.1): stardist 0.9.2 ships
  ``data/images/img2d.tif`` (512 x 512 grey) and ``mask2d.tif`` (uint16 labels, 125 nuclei). They are found
  through the installed distribution's file list, never by importing stardist (which needs TensorFlow).
  The grey image becomes uint8 by stardist's own normalisation rule (csbdeep ``normalize``: percentiles
  1 and 99.8 map to 0 and 1, clipped), times 255, rounded, and repeated into three channels.
* **Generated shapes** (the smoke tier): ellipses, rotated rectangles and polygons with random colours and
  texture noise; later shapes occlude earlier ones, so masks are exact and disjoint.
* **CIFAR-10 backgrounds**: training images of ``<data root>/cifar10/cifar10_jpeg.zip`` (located like the
  imagenet and coco_fid tasks do), upscaled as backgrounds for generated scenes.

Images are (H, W, 3) uint8 RGB (greyscale COCO images converted); masks (H, W) bool; boxes xyxy floats in
original pixels. Every bad input raises :class:`bench.BenchError` naming the path or field and what is valid.
"""

from __future__ import annotations

import importlib.metadata
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench import BenchError

from .prompts import coco_box_xyxy, mask_box

MIN_SHAPE_PIXELS = 16  # generated instances left smaller than this by occlusion are dropped (spec)
NUCLEI_PERCENTILES = (1.0, 99.8)  # csbdeep.utils.normalize defaults (pmin, pmax), used by stardist's examples
NUCLEI_FILES = ("img2d.tif", "mask2d.tif")  # stardist/data/images/


@dataclass
class Instance:
    mask: np.ndarray  # (H, W) bool
    box: tuple[float, float, float, float]  # xyxy, original pixels
    category_id: int
    ann_id: int
    iscrowd: bool = False


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    instances: list[Instance] = field(default_factory=list)
    image_id: int = 0
    name: str = ""
    source: str = ""


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise BenchError(f"{path} not found; expected {what}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchError(f"{path} is not readable JSON ({exc}); expected {what}") from exc
    if not isinstance(data, dict):
        raise BenchError(f"{path} holds a {type(data).__name__}; expected {what}")
    return data


def _need(d: dict, keys: tuple[str, ...], where: str, valid: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise BenchError(f"{where} lacks {missing}; {valid}")


def _read_rgb(path: Path, hw: tuple[int, int] | None = None) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise BenchError(f"image {path} not found")
    try:
        with Image.open(path) as im:
            # No EXIF transpose: COCO's annotations are in the stored pixel orientation.
            image = np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise BenchError(f"image {path} is not a readable image ({exc})") from exc
    if hw is not None and image.shape[:2] != tuple(hw):
        raise BenchError(f"image {path} is {image.shape[0]}x{image.shape[1]} (h x w) but its annotation says "
                         f"{hw[0]}x{hw[1]}")
    return image


def load_coco_subset(root: Path, limit: int | None = None) -> tuple[list[Scene], dict]:
    """``(scenes in image-id order, the instances dict)`` of a COCO-style root ``images/`` +
    ``instances.json``. ``limit`` keeps the first images by id (the returned dict is cut to match, so
    :func:`~.metrics.coco_mask_ap` scores exactly those)."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    root = Path(root)
    valid = "a COCO instances file with 'images', 'annotations' and 'categories' (e.g. <data root>/coco_val_subset)"
    gt = _read_json(root / "instances.json", valid)
    _need(gt, ("images", "annotations", "categories"), f"{root / 'instances.json'}", valid)
    for im in gt["images"]:
        _need(im, ("id", "file_name", "height", "width"), f"{root / 'instances.json'}: image entry {im.get('id')}",
              "each image needs id, file_name, height, width")
    images = sorted(gt["images"], key=lambda im: im["id"])
    if limit is not None:
        images = images[: max(int(limit), 0)]
        keep = {im["id"] for im in images}
        gt = {**gt, "images": images, "annotations": [a for a in gt["annotations"] if a.get("image_id") in keep]}
    coco = COCO()
    coco.dataset = gt
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
            coco.createIndex()
    except (KeyError, TypeError) as exc:
        raise BenchError(f"{root / 'instances.json'}: an annotation lacks {exc} (each needs id and image_id); "
                         f"{valid}") from exc
    scenes = []
    for im in images:
        image = _read_rgb(root / "images" / im["file_name"], (im["height"], im["width"]))
        instances = []
        for ann in sorted(coco.imgToAnns.get(im["id"], []), key=lambda a: a["id"]):
            _need(ann, ("id", "segmentation", "bbox", "category_id"), f"{root / 'instances.json'}: annotation "
                  f"{ann.get('id')}", "each annotation needs id, segmentation, bbox, category_id")
            try:
                with warnings.catch_warnings():  # pycocotools' decode trips numpy 2's copy= deprecation
                    warnings.simplefilter("ignore", DeprecationWarning)
                    mask = coco.annToMask(ann).astype(bool)
            except Exception as exc:  # pycocotools raises bare TypeErrors/ValueErrors on malformed segmentations
                raise BenchError(f"{root / 'instances.json'}: annotation {ann['id']} has an unreadable segmentation "
                                 f"({exc}); expected polygons or RLE") from exc
            instances.append(Instance(mask, coco_box_xyxy(ann["bbox"]), int(ann["category_id"]), int(ann["id"]),
                                      bool(ann.get("iscrowd", 0))))
        scenes.append(Scene(image, instances, int(im["id"]), im["file_name"], "coco_val_subset"))
    return scenes, gt


def rgb2id(png: np.ndarray) -> np.ndarray:
    """Panoptic segment ids of an (H, W, 3) PNG: ``R + 256 G + 256² B`` (COCO panoptic format)."""
    png = np.asarray(png).astype(np.int64)
    return png[..., 0] + 256 * png[..., 1] + 256 * 256 * png[..., 2]


def load_coco_panoptic_sample(root: Path) -> list[Scene]:
    """The thing segments of a COCO panoptic root (``images/``, ``panoptic/``, ``panoptic_examples.json``,
    ``panoptic_coco_categories.json``), one scene per annotation in file order."""
    from PIL import Image

    root = Path(root)
    valid = "COCO panoptic annotations with 'images' and 'annotations' (e.g. <data root>/coco_sample)"
    ann_path = root / "panoptic_examples.json"
    data = _read_json(ann_path, valid)
    _need(data, ("images", "annotations"), str(ann_path), valid)
    cat_path = root / "panoptic_coco_categories.json"
    if not cat_path.is_file():
        raise BenchError(f"{cat_path} not found; expected panopticapi's category list (id, isthing per category)")
    with open(cat_path, encoding="utf-8") as f:
        isthing = {int(c["id"]): bool(c["isthing"]) for c in json.load(f)}
    images = {im["id"]: im for im in data["images"]}
    scenes = []
    for ann in data["annotations"]:
        _need(ann, ("image_id", "file_name", "segments_info"), f"{ann_path}: annotation of image {ann.get('image_id')}",
              "each needs image_id, file_name, segments_info")
        im = images.get(ann["image_id"])
        if im is None:
            raise BenchError(f"{ann_path}: annotation {ann['file_name']} names image_id {ann['image_id']}, which is "
                             "not among its 'images'")
        image = _read_rgb(root / "images" / im["file_name"], (im["height"], im["width"]))
        png_path = root / "panoptic" / ann["file_name"]
        if not png_path.is_file():
            raise BenchError(f"panoptic PNG {png_path} not found (annotation of image {ann['image_id']})")
        with Image.open(png_path) as p:
            ids = rgb2id(np.asarray(p.convert("RGB")))
        if ids.shape != image.shape[:2]:
            raise BenchError(f"panoptic PNG {png_path} is {ids.shape[0]}x{ids.shape[1]} but image "
                             f"{im['file_name']} is {image.shape[0]}x{image.shape[1]} (h x w); they must match")
        instances = []
        for seg in ann["segments_info"]:
            cat = int(seg["category_id"])
            if cat not in isthing:
                raise BenchError(f"{ann_path}: segment {seg['id']} has category {cat}, not in {cat_path}")
            if not isthing[cat]:
                continue  # stuff: SAM's instance protocols prompt objects only
            mask = ids == int(seg["id"])
            if not mask.any():
                raise BenchError(f"{ann_path}: segment {seg['id']} does not occur in {png_path}")
            instances.append(Instance(mask, coco_box_xyxy(seg["bbox"]), cat, int(seg["id"]),
                                      bool(seg.get("iscrowd", 0))))
        scenes.append(Scene(image, instances, int(ann["image_id"]), im["file_name"], "coco_panoptic_sample"))
    return scenes


def nuclei_files() -> tuple[Path, Path]:
    """Paths of stardist's ``img2d.tif`` and ``mask2d.tif`` from the installed distribution's file list."""
    try:
        files = importlib.metadata.files("stardist")
    except importlib.metadata.PackageNotFoundError as exc:
        raise BenchError("the DSB nuclei scene comes from the stardist package's data files, and stardist is not "
                         "installed: pip install --no-deps stardist (plus tifffile)") from exc
    found = {f.name: Path(f.locate()) for f in files or () if f.parts[-3:-1] == ("data", "images")}
    missing = [n for n in NUCLEI_FILES if n not in found or not found[n].is_file()]
    if missing:
        raise BenchError(f"the installed stardist has no stardist/data/images/{missing}; expected stardist 0.9.2 "
                         "(pip install --no-deps stardist==0.9.2)")
    return found[NUCLEI_FILES[0]], found[NUCLEI_FILES[1]]


def grey_to_uint8(image: np.ndarray) -> np.ndarray:
    """A grey image -> uint8 by percentiles 1 / 99.8 -> 0 / 255, clipped, rounded (stardist's normalisation)."""
    x = np.asarray(image, dtype=np.float64)
    lo, hi = np.percentile(x, NUCLEI_PERCENTILES)
    scaled = np.clip((x - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    return np.round(scaled * 255.0).astype(np.uint8)


def scene_from_labels(image: np.ndarray, labels: np.ndarray, *, image_id: int = 0, name: str = "",
                      source: str = "") -> Scene:
    """A scene from a grey or RGB image and an integer label image (0 background, one instance per label)."""
    image, labels = np.asarray(image), np.asarray(labels)
    if labels.ndim != 2 or labels.shape != image.shape[:2]:
        raise BenchError(f"{name or 'label image'}: mask shape {labels.shape} differs from image shape "
                         f"{image.shape[:2]}; the label image must be (H, W) of the image's size")
    if image.ndim == 2:
        image = np.repeat(grey_to_uint8(image)[..., None], 3, axis=2)
    elif image.dtype != np.uint8 or image.shape[2] != 3:
        raise BenchError(f"{name or 'image'}: expected a grey (H, W) or uint8 RGB (H, W, 3) image, got shape "
                         f"{image.shape} dtype {image.dtype}")
    instances = []
    for lab in np.unique(labels):
        if lab <= 0:
            continue
        mask = labels == lab
        instances.append(Instance(mask, mask_box(mask), 1, int(lab), False))
    return Scene(image, instances, image_id, name, source)


def load_nuclei() -> Scene:
    """The DSB-2018 nuclei scene shipped with stardist (512 x 512, 125 instances, category 1)."""
    try:
        import tifffile
    except ImportError as exc:
        raise BenchError("reading the stardist nuclei TIFFs needs tifffile: pip install tifffile") from exc
    img_path, mask_path = nuclei_files()
    image, labels = tifffile.imread(img_path), tifffile.imread(mask_path)
    if image.ndim != 2:
        raise BenchError(f"{img_path}: expected a 2-D grey image, got shape {image.shape}")
    if labels.shape != image.shape:
        raise BenchError(f"{mask_path}: mask shape {labels.shape} differs from image shape {image.shape} of {img_path}")
    return scene_from_labels(image, labels, name="img2d.tif", source="stardist/dsb2018")


# --------------------------------------------------------------------------------------------------
# Generated scenes
# --------------------------------------------------------------------------------------------------

SHAPE_KINDS = ("ellipse", "rectangle", "polygon")  # category ids 1, 2, 3
OBJECT_KINDS = ("ellipse", "rectangle", "polygon", "blob")  # object-like scenes (``textures``)
ALL_KINDS = ("ellipse", "rectangle", "polygon", "blob")  # category id = index + 1


def _smooth_background(rng: np.random.Generator, size: int) -> np.ndarray:
    # A colour gradient plus mild noise: enough texture that a shape is not the only structure in the image.
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    c0, c1, c2 = (rng.uniform(0, 255, 3) for _ in range(3))
    img = c0 + (c1 - c0) * xx[..., None] + (c2 - c0) * yy[..., None] + rng.normal(0, 6, (size, size, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _shape_mask(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    cx, cy = rng.uniform(0.1, 0.9, 2) * size
    a, b = rng.uniform(size / 16, size / 5, 2)  # half-extents
    theta = rng.uniform(0, np.pi)
    if kind == "ellipse":
        yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
        u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
        v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if kind == "rectangle":
        corners = np.array([[-a, -b], [a, -b], [a, b], [-a, b]])
    else:  # a star-shaped polygon with 3-6 vertices at sorted angles
        k = int(rng.integers(3, 7))
        ang = np.sort(rng.uniform(0, 2 * np.pi, k))
        rad = rng.uniform(0.5, 1.0, k) * max(a, b)
        corners = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    pts = corners @ rot.T + [cx, cy]
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in pts], fill=1)
    return np.asarray(canvas, bool)


def _part_mask(rng: np.random.Generator, kind: str, size: int, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    """One part of an object-like shape: an ellipse, rectangle, polygon or smooth blob centred at (cx, cy) with
    half-extents about (a, b), rotated at random."""
    from PIL import Image, ImageDraw

    theta = rng.uniform(0, np.pi)
    if kind == "ellipse":
        yy, xx = np.mgrid[0:size, 0:size] + 0.5
        u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
        v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if kind == "rectangle":
        corners = np.array([[-a, -b], [a, -b], [a, b], [-a, b]])
    elif kind == "polygon":
        k = int(rng.integers(3, 8))
        ang = np.sort(rng.uniform(0, 2 * np.pi, k))
        rad = rng.uniform(0.5, 1.0, k)
        corners = np.stack([rad * a * np.cos(ang), rad * b * np.sin(ang)], axis=1)
    else:  # blob: r(t) = 1 + sum_k c_k cos(k t + p_k), k = 2..5, a smooth star-shaped outline
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        r = 1.0 + sum(rng.uniform(0, 0.25 / (k - 1)) * np.cos(k * t + rng.uniform(0, 2 * np.pi)) for k in range(2, 6))
        corners = np.stack([r * a * np.cos(t), r * b * np.sin(t)], axis=1)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    pts = corners @ rot.T + [cx, cy]
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in pts], fill=1)
    return np.asarray(canvas, bool)


def _fill(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, textures: np.ndarray) -> None:
    """Paint ``mask`` in ``image``: three times in four with a random photograph of ``textures`` (flipped at
    random, resized to the mask's bounding box), else a flat bright colour with per-pixel noise."""
    from PIL import Image

    if rng.uniform() < 0.25:
        colour = rng.uniform(0, 255, 3)
        colour[int(rng.integers(3))] = rng.uniform(100, 255)
        texture = colour + rng.normal(0, rng.uniform(0, 12), (*mask.shape, 3))
        image[mask] = np.clip(np.round(texture[mask]), 0, 255).astype(np.uint8)
        return
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    tex = textures[int(rng.integers(len(textures)))]
    if rng.uniform() < 0.5:
        tex = tex[:, ::-1]
    patch = np.asarray(Image.fromarray(np.ascontiguousarray(tex)).resize((int(x1 - x0), int(y1 - y0)), Image.BICUBIC))
    region = image[y0:y1, x0:x1]
    sub = mask[y0:y1, x0:x1]
    region[sub] = patch[sub]


def _object_mask(rng: np.random.Generator, kind: str, size: int, image: np.ndarray, textures: np.ndarray) -> np.ndarray:
    """Draw one object-like instance into ``image`` and return its mask: a main part of ``kind`` (half-extents
    1/24 to 1/3 of the side) and, half the time, 1-2 more parts of random kinds centred on the main part's
    outline (0.4-0.8 of its size), each part filled on its own (`_fill`)."""
    cx, cy = rng.uniform(0.05, 0.95, 2) * size
    a, b = rng.uniform(size / 24, size / 3, 2)
    main = _part_mask(rng, kind, size, cx, cy, a, b)
    parts = [main]
    if main.any() and rng.uniform() < 0.5:
        for _ in range(int(rng.integers(1, 3))):
            ys, xs = np.nonzero(main)
            j = int(rng.integers(len(ys)))
            s = rng.uniform(0.4, 0.8)
            sub_kind = OBJECT_KINDS[int(rng.integers(len(OBJECT_KINDS)))]
            parts.append(_part_mask(rng, sub_kind, size, xs[j] + 0.5, ys[j] + 0.5, a * s, b * s))
    union = np.zeros((size, size), bool)
    for part in parts:
        if part.any():
            _fill(rng, image, part, textures)
            union |= part
    return union


def shapes_scene(rng: np.random.Generator, size: int, n_shapes: int, background: np.ndarray | None = None,
                 image_id: int = 0, textures: np.ndarray | None = None) -> Scene:
    """A generated ``size x size`` scene of ``n_shapes`` shapes drawn in order, later ones on top.

    Masks are the pixels each shape still owns after occlusion, so they are disjoint and every drawn pixel
    belongs to exactly one mask; a shape left with fewer than ``MIN_SHAPE_PIXELS`` pixels is dropped and
    its pixels get the background back (as if it had not been drawn). ``background`` (any (H, W, 3) uint8)
    is resized to ``size`` when its size differs. Everything follows from ``rng``.

    With ``textures`` ((N, h, w, 3) uint8 photographs, e.g. CIFAR-10 train images) the scene is *object-like*
    (`_object_mask`, `_fill`): shapes also include smooth random blobs, span 1/12 to 2/3 of the side, are
    often composites of 2-3 overlapping parts (the instance is their union), and each part is filled with a
    photograph's texture (or, one time in four, the flat colour + noise above), so that an instance is
    neither one colour nor one texture — what a box around a real object holds. Without ``textures`` the
    scene is exactly the plain one (same draws from ``rng``)."""
    from PIL import Image

    if size < 8 or n_shapes < 0:
        raise BenchError(f"shapes_scene: needs size >= 8 and n_shapes >= 0, got size={size}, n_shapes={n_shapes}")
    if background is None:
        bg = _smooth_background(rng, size)
    else:
        bg = np.asarray(background)
        if bg.ndim != 3 or bg.shape[2] != 3 or bg.dtype != np.uint8:
            raise BenchError(f"shapes_scene: background must be (H, W, 3) uint8, got {bg.shape} {bg.dtype}")
        if bg.shape[:2] != (size, size):
            bg = np.asarray(Image.fromarray(bg).resize((size, size), Image.BICUBIC))
    image = bg.copy()
    owner = np.full((size, size), -1, np.int64)
    kinds = []
    for k in range(n_shapes):
        if textures is not None:
            kind = OBJECT_KINDS[int(rng.integers(len(OBJECT_KINDS)))]
            mask = _object_mask(rng, kind, size, image, textures)
            if mask.any():
                owner[mask] = k
            kinds.append(kind)
            continue
        kind = SHAPE_KINDS[int(rng.integers(len(SHAPE_KINDS)))]
        mask = _shape_mask(rng, kind, size)
        # A bright-enough base colour (max channel >= 100) with per-pixel noise as texture.
        colour = rng.uniform(0, 255, 3)
        colour[int(rng.integers(3))] = rng.uniform(100, 255)
        texture = colour + rng.normal(0, rng.uniform(0, 12), (size, size, 3))
        image[mask] = np.clip(np.round(texture[mask]), 0, 255).astype(np.uint8)
        owner[mask] = k
        kinds.append(kind)
    instances = []
    for k, kind in enumerate(kinds):
        mask = owner == k
        if np.count_nonzero(mask) < MIN_SHAPE_PIXELS:
            image[mask] = bg[mask]
            continue
        instances.append(Instance(mask, mask_box(mask), ALL_KINDS.index(kind) + 1, k + 1, False))
    return Scene(image, instances, image_id, f"shapes-{image_id}", "generated")


def cifar_backgrounds(data_root: Path, n: int, seed: int, size: int) -> np.ndarray:
    """``n`` CIFAR-10 *train* images, (n, size, size, 3) uint8, picked without replacement by ``seed`` from
    the sorted member list and upscaled with PIL bicubic.

    The zip is found by the imagenet task's ``cifar_zip`` (the same lookup coco_fid uses); members are read
    straight from it rather than through ``extract_cifar``, which unpacks all 60,000 files into a cache
    directory this function does not have, to read a handful of them."""
    import zipfile

    from PIL import Image

    from ..imagenet import data as idata

    zp = idata.cifar_zip(data_root)
    if zp is None:
        raise BenchError(f"CIFAR-10 zip not found at <data root>/{idata.CIFAR_ZIP} (data root: {data_root})")
    try:
        with zipfile.ZipFile(zp) as zf:
            names = sorted(m for m in zf.namelist() if m.startswith("train/") and m.lower().endswith(".jpg"))
            if n > len(names):
                raise BenchError(f"{zp} has {len(names)} train/ JPEGs; cannot pick n={n} backgrounds")
            picks = np.random.default_rng(seed).choice(len(names), size=n, replace=False)
            out = np.empty((n, size, size, 3), np.uint8)
            for i, j in enumerate(picks):
                with zf.open(names[j]) as fh, Image.open(fh) as im:
                    out[i] = np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC))
    except zipfile.BadZipFile as exc:
        raise BenchError(f"{zp} is not a readable zip ({exc}); expected CIFAR-10 as in SOURCES.md "
                         f"(md5 {idata.CIFAR_MD5})") from exc
    return out
