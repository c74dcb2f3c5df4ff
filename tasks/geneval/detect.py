"""A programmatic object detector for rendered shapes: GenEval's detector and colour classifier, offline.

Part of the synthetic GenEval-like task (GenEval: Ghosh et al., NeurIPS 2023; djghosh13/geneval @
af4902f24d3ca90ebbb446dd9891a59e0f82725f). GenEval detects COCO objects with Mask2Former (Swin-S,
mmdet) and names each object's colour with zero-shot CLIP ViT-L-14 on its masked crop; both need
downloaded weights and a GPU. This detector replaces both for images of ``prompts.SHAPES`` on a #999 grey
background, and returns what the rule engine (``rules.py``) needs: class, score, box, mask and colour.

How it works:

1. Colour segmentation: each pixel goes to the nearest CIELAB prototype, or to nothing when the nearest is
   more than ``CUTOFF`` away. The prototypes are GenEval's ten colours (``render.PALETTE``), the #999
   background, and each colour blended with the background at coverages 0.1-0.9: an object's edge pixels
   (blurred, anti-aliased or generated) are such blends, and a blend with at least half the colour
   belongs to the colour, a thinner one to the background. Background pixels are never part of an
   object. (Without the blends, a 0.5 px Gaussian blur of the ground-truth scenes dropped counting
   accuracy from 1.0 to 0.64 and read some diamonds and triangles as circles or squares.)
2. Components: per colour, 8-connected components (``scipy.ndimage.label``); components with fewer than
   ``MIN_AREA`` pixels or a box side outside [``MIN_SIDE``, ``MAX_SIDE``] are not objects.
3. Shape: the component's mask is compared (IoU) with every shape redrawn by ``render.shape_mask`` in the
   component's own bounding box. This measures what fill ratio, aspect and holes would (a ring's hole, a
   square's full box, a circle's 0.785 fill) and also tells apart shapes with equal fill (triangle and
   diamond both fill about half their box). The class is the best-matching shape.
4. Score = colour purity x shape fit x aspect, in [0, 1]:
   * purity: the mean over the mask of a per-pixel weight, 1 within ``TOLERANCE`` CIELAB units of the
     pixel's prototype (pure or blend), falling linearly to 0 at ``CUTOFF``; times a core term, 1 when
     the object's purest pixel has at least ``CORE_FULL`` coverage, falling to 0 at 0.5 (edges may be
     blends, a washed-out object is not a clean instance of its colour);
   * shape fit: the margin of the best IoU over the runner-up (and over ``FIT_FLOOR``), divided by
     ``FIT_MARGIN`` and clipped to [0, 1];
   * aspect: 1 up to a 1.5 side ratio, falling linearly to 0 at 2 (every shape is drawn in a square box).
   A crisp render scores 1; an ambiguous blob scores low, so GenEval's thresholds keep their meaning:
   above 0.3 is "probably this shape", above 0.9 (counting prompts) demands a crisp, unambiguous one.
5. Colour name: the nearest of the ten colour prototypes (background excluded) to the median colour of
   the mask's pixels, each with its background blend undone (pixel = bg + coverage * (colour - bg)), in
   CIELAB; the same "at least count of the target colour" rule then applies.

Deviations from GenEval: the detector and the colour classifier (above); the colour is classified from
the masked pixels themselves rather than a crop composited on #999 (the same pixels, without CLIP);
at most one detection per connected component, so there are no duplicate boxes for NMS to remove.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bench import BenchError

from .prompts import COLORS, SHAPES
from .render import BACKGROUND, PALETTE, shape_mask

CUTOFF = 20.0        # CIELAB units; about half the smallest pure-colour distance (36.8, white vs #999)
TOLERANCE = 12.0     # CIELAB units of full purity: above sigma = 4/255 pixel noise (99th pct <= 9.3)
MIN_AREA = 10        # px; the smallest rendered object (a 7 px triangle) has 25
MIN_SIDE, MAX_SIDE = 5, 16   # px box sides accepted; rendered objects are 7-10
FIT_FLOOR = 0.6      # an IoU this low means "no shape", even with no close runner-up
FIT_MARGIN = 0.12    # IoU margin of full confidence; closest shapes (circle, square, 9 px): 0.15
ASPECT_FULL, ASPECT_ZERO = 1.5, 2.0
CORE_FULL = 0.9      # colour coverage of the purest pixel needed for full purity (0 at 0.5)


@dataclass(frozen=True)
class Detection:
    """One detected object; ``box`` is (x0, y0, x1, y1) in pixels with x1, y1 exclusive."""

    cls: str
    score: float
    box: tuple[int, int, int, int]
    color: str
    mask: np.ndarray = field(repr=False, compare=False)  # bool [H, W], the component's pixels
    iou: float = 0.0      # best shape IoU (diagnostic)
    purity: float = 0.0   # colour purity (diagnostic)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB values in [0, 255], over the last axis."""
    c = np.asarray(rgb, np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = lin @ _SRGB_TO_XYZ.T / _D65
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                         [0.2126729, 0.7151522, 0.0721750],
                         [0.0193339, 0.1191920, 0.9503041]])
_D65 = np.array([0.95047, 1.0, 1.08883])
# Colour prototypes: every colour blended with the background at a range of coverages, since an object's
# edge pixels (anti-aliased, blurred or generated) are such blends. Blends with at least half the colour
# belong to the colour; thinner ones, and the background itself, to the background.
_COVER_FG = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_COVER_BG = (0.1, 0.2, 0.3, 0.4)
_BG = len(COLORS)  # label of the background; 0..9 are the colours in GenEval's order


def _blends():
    bg = np.array(BACKGROUND, np.float64)
    rgb, label, cover = [bg], [_BG], [0.0]
    for i, name in enumerate(COLORS):
        for a in _COVER_FG + _COVER_BG:
            rgb.append(bg + a * (np.array(PALETTE[name], np.float64) - bg))
            label.append(i if a >= 0.5 else _BG)
            cover.append(a)
    return srgb_to_lab(np.array(rgb)), np.array(label), np.array(cover)


_PROTOS, _PROTO_LABEL, _PROTO_COVER = _blends()
_PURE = srgb_to_lab(np.array([PALETTE[c] for c in COLORS], np.float64))  # the ten names' prototypes
_EIGHT = np.ones((3, 3), bool)


def _as_uint8(image) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise BenchError(f"detect expects an [H, W, 3] RGB image, got shape {img.shape}")
    if img.dtype == np.uint8:
        return img
    if np.issubdtype(img.dtype, np.floating):  # floats are taken as [0, 1]
        return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    raise BenchError(f"detect expects uint8 or float [0, 1] pixels, got {img.dtype}")


def color_name(rgb) -> str:
    """The nearest of GenEval's ten colour names (CIELAB) to one sRGB colour in [0, 255]."""
    d = np.linalg.norm(srgb_to_lab(np.asarray(rgb, np.float64))[None] - _PURE, axis=-1)
    return COLORS[int(d.argmin())]


def segment_colors(image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel: the label (0-9 the colours, 10 background, -1 nothing within CUTOFF), the CIELAB
    distance to the nearest prototype, and that prototype's coverage (the colour's share of a blend with
    the background; 1 for a pure colour)."""
    lab = srgb_to_lab(_as_uint8(image))
    # Squared distances as |x|^2 - 2 x.p + |p|^2: one small matrix product instead of an [H, W, P, 3] array.
    d2 = (lab ** 2).sum(-1, keepdims=True) - 2 * lab @ _PROTOS.T + (_PROTOS ** 2).sum(-1)
    nearest = d2.argmin(-1)
    dmin = np.sqrt(np.maximum(np.take_along_axis(d2, nearest[..., None], -1)[..., 0], 0.0))
    label = np.where(dmin > CUTOFF, -1, _PROTO_LABEL[nearest])
    return label, dmin, _PROTO_COVER[nearest]


def _ramp(x: float, full: float, zero: float) -> float:
    """1 up to ``full``, 0 from ``zero``, linear between."""
    return float(np.clip((zero - x) / (zero - full), 0.0, 1.0))


def detect(image, shapes: tuple[str, ...] = SHAPES) -> list[Detection]:
    """All shape objects found in an RGB image (uint8, or float in [0, 1]), most confident first."""
    from scipy import ndimage

    img = _as_uint8(image)
    label, dmin, cover = segment_colors(img)
    weight = np.clip((CUTOFF - dmin) / (CUTOFF - TOLERANCE), 0.0, 1.0)
    found = []
    for c in np.unique(label):
        if c < 0 or c == _BG:
            continue
        comps, _ = ndimage.label(label == c, structure=_EIGHT)
        for k, sl in enumerate(ndimage.find_objects(comps), 1):
            h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
            if not (MIN_SIDE <= min(h, w) and max(h, w) <= MAX_SIDE):
                continue
            local = comps[sl] == k
            area = int(local.sum())
            if area < MIN_AREA:
                continue
            ious = sorted(((local & (t := shape_mask(s, w, h))).sum() / (local | t).sum(), s) for s in shapes)
            best, cls = ious[-1]
            second = ious[-2][0] if len(ious) > 1 else 0.0
            fit = float(np.clip((best - max(second, FIT_FLOOR)) / FIT_MARGIN, 0.0, 1.0))
            aspect = _ramp(max(h, w) / min(h, w), ASPECT_FULL, ASPECT_ZERO)
            # Edge pixels may be blends, but a real object has a (nearly) pure core: a washed-out one
            # loses purity in proportion.
            core = _ramp(-float(cover[sl][local].max()), -CORE_FULL, -0.5)
            purity = float(weight[sl][local].mean()) * core
            score = purity * fit * aspect
            if score <= 0:
                continue
            mask = np.zeros(label.shape, bool)
            mask[sl] = local
            # The median colour of the mask with each pixel's background blend undone.
            bg = np.array(BACKGROUND, np.float64)
            pure = bg + (img[sl][local] - bg) / cover[sl][local][:, None]
            median = np.clip(np.median(pure, axis=0), 0, 255)
            found.append(Detection(cls, score, (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop),
                                   color_name(median), mask, float(best), purity))
    found.sort(key=lambda d: -d.score)
    return found
