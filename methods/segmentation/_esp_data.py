"""Microscopy data of `esp_medsam`: generated nucleus scenes to train on, and ESP's prompt-free binary evaluation
on the real DSB-2018 nuclei image (the stardist sample the ``sam`` task ships; never trained on).

* **Generated scenes** (`nucleus_scene`): grey fluorescence-like images drawn at the DSB image's 512 x 512 scale
  — a dark, smoothly varying background; 20-150 bright nuclei, each a rotated ellipse (axis ratio 0.5-1) with
  a slightly wobbly outline (harmonics 2-4), equivalent diameter 10-30 px (the 125 DSB nuclei measure 11-28 px
  between their 5th and 95th percentiles, median 24), a per-nucleus brightness with a brighter centre and
  speckle; overlapping nuclei composite by maximum; Gaussian blur and noise. The binary semantic mask is the
  union of the nuclei (ESP binarises instance masks, E:dataloader.py). A scene is a pure function of
  (seed, step, index), so a resumed cell sees the same scenes. Scenes go through the task's input frame:
  ``sam_input`` (resize longest side to S, SAM normalisation, padding) and ``resize_pad_mask``.
* **Evaluation** (E:eval.py): one prompt-free forward, logits at S x S cropped to the resized image, resized to
  the original size (bilinear), sigmoid > 0.5; Dice = (2|P∩G| + 1) / (|P| + |G| + 1), IoU = (|P∩G| + 1) /
  (|P∪G| + 1), against the union of the 125 instance masks.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

REF_SIZE = 512  # the DSB sample's side: scenes are drawn at its scale, then put in the task's frame
NUCLEI_RANGE = (20, 150)  # nuclei per generated scene (inclusive)
DIAMETER_RANGE = (10.0, 30.0)  # equivalent diameter in px at REF_SIZE
_TAG = 7_340_033  # separates these scenes' random streams from everything else seeded by (seed, step)


def nucleus_scene(rng: np.random.Generator, size: int = REF_SIZE,
                  count: tuple[int, int] = NUCLEI_RANGE) -> tuple[np.ndarray, np.ndarray]:
    """An (size, size, 3) uint8 grey image and its (size, size) bool nucleus mask; everything from ``rng``."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    scale = size / REF_SIZE
    coarse = rng.uniform(0, 1, (6, 6)).astype(np.float32)
    shade = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), np.float64)
    image = rng.uniform(4, 30) + rng.uniform(0, 15) * shade
    mask = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        d = rng.uniform(*DIAMETER_RANGE) * scale
        ratio = rng.uniform(0.5, 1.0)
        a, b = d / 2 / np.sqrt(ratio), d / 2 * np.sqrt(ratio)  # area of a disc of diameter d
        cx, cy = rng.uniform(0, size, 2)
        theta = rng.uniform(0, np.pi)
        wobble = [(rng.uniform(0, 0.08), k, rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)]
        r = int(np.ceil(a * 1.3)) + 1
        y0, y1 = max(0, int(cy) - r), min(size, int(cy) + r + 1)
        x0, x1 = max(0, int(cx) - r), min(size, int(cx) + r + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
        u = ((xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)) / a
        v = (-(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)) / b
        t = np.arctan2(v, u)
        edge = 1.0 + sum(c * np.cos(k * t + ph) for c, k, ph in wobble)
        rho = np.sqrt(u ** 2 + v ** 2) / edge
        inside = rho <= 1.0
        level = rng.uniform(35, 230) * (0.75 + 0.25 * (1 - np.clip(rho, 0, 1) ** 2))
        level = level * (1 + rng.uniform(0, 0.15) * rng.standard_normal(level.shape))
        region = image[y0:y1, x0:x1]
        region[inside] = np.maximum(region[inside], level[inside])
        mask[y0:y1, x0:x1] |= inside
    image = gaussian_filter(image, sigma=rng.uniform(0.5, 1.5) * max(scale, 0.25))
    image = image + rng.normal(0, rng.uniform(1.5, 8), image.shape)
    grey = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2), mask


def microscopy_batch(seed: int, step: int, n: int, img_size: int, stream: int = 0) -> dict:
    """``n`` generated scenes in the task's input frame: ``image`` (n,3,S,S) float32 (SAM-normalised, padded) and
    ``mask`` (n,1,S,S) float32 {0,1}. A pure function of (seed, step, index, stream)."""
    import torch

    from bench.tasks.sam.prompts import resize_pad_mask, sam_input

    images, masks = [], []
    for i in range(n):
        rng = np.random.default_rng([_TAG, int(seed), int(stream), int(step), i])
        img, m = nucleus_scene(rng)
        images.append(sam_input(img, img_size))
        masks.append(resize_pad_mask(m, img_size)[None].astype(np.float32))
    return {"image": torch.from_numpy(np.stack(images)), "mask": torch.from_numpy(np.stack(masks))}


def dice_iou(pred: np.ndarray, gt: np.ndarray, smooth: float = 1.0) -> tuple[float, float]:
    """E:eval.py: Dice = (2|P∩G| + s) / (|P| + |G| + s), IoU = (|P∩G| + s) / (|P∪G| + s), s = 1."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    inter = float(np.count_nonzero(pred & gt))
    p, g = float(np.count_nonzero(pred)), float(np.count_nonzero(gt))
    return (2 * inter + smooth) / (p + g + smooth), (inter + smooth) / (p + g - inter + smooth)


def binary_prediction(logits, hw: tuple[int, int], img_size: int, threshold: float = 0.5) -> np.ndarray:
    """(1,1,S,S) logits in the task's frame -> an (H, W) bool mask at the original size: crop the padding,
    bilinear resize to (H, W), sigmoid > threshold."""
    import torch.nn.functional as F

    from bench.tasks.sam.prompts import resize_longest

    nh, nw = resize_longest(hw[0], hw[1], img_size)
    crop = logits[..., :nh, :nw].float()
    full = F.interpolate(crop, size=tuple(hw), mode="bilinear", align_corners=False)
    return (full.sigmoid() > threshold)[0, 0].cpu().numpy()


def nuclei_target(img_size: int):
    """The real DSB nuclei image in the task's frame ((1,3,S,S) tensor), its union mask (H, W) and (H, W)."""
    import torch

    from bench.tasks.sam.data import load_nuclei
    from bench.tasks.sam.prompts import sam_input

    scene = load_nuclei()
    gt = np.zeros(scene.image.shape[:2], bool)
    for inst in scene.instances:
        gt |= inst.mask
    x = torch.from_numpy(sam_input(scene.image, img_size))[None]
    return x, gt, scene.image.shape[:2], len(scene.instances)


def score(segment: Callable, x, gt: np.ndarray, hw: tuple[int, int], img_size: int,
          threshold: float = 0.5) -> dict[str, float]:
    """Dice / IoU of ``segment(x)`` (prompt-free (B,1,S,S) logits) against ``gt`` per E:eval.py."""
    dice, iou = dice_iou(binary_prediction(segment(x), hw, img_size, threshold), gt)
    return {"dice": round(dice, 6), "iou": round(iou, 6)}
