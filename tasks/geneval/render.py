"""Ground-truth scenes for GenEval-like shape prompts: one image that satisfies a prompt, deterministically.

Part of the synthetic GenEval-like task (GenEval: Ghosh et al., NeurIPS 2023; djghosh13/geneval @
af4902f24d3ca90ebbb446dd9891a59e0f82725f). GenEval scores photographs from a text-to-image model and has
no renderer; this module is what the shape task substitutes for real images (training data for the
teacher, and the detector's validation scenes).

A scene is a #999999 grey canvas (GenEval composites every colour crop onto #999, so black and white
objects stay visible) with exactly the include clauses' objects: ``count`` objects per clause, each a
shape from ``prompts.SHAPES`` drawn as a crisp (not anti-aliased) pixel mask in a square box of side 7-10
px, in the clause's colour or, when the clause names none, a random one of GenEval's ten colours.
Boxes keep at least ``GAP`` px apart, so same-coloured objects never touch. A clause with
``position = [rel, i]`` is placed so that every one of its objects holds ``rel`` to every object of
clause i under GenEval's position rule with a stricter shrink (0.2 instead of 0.1 per unit of size), so
the relation is unambiguous, not marginal. Exclude clauses add nothing (the scene has exactly the
included count, below every generated exclude count).

Shape masks are defined on pixel centres in the unit box [-1, 1]^2 and always touch all four sides of
their box, so a detector that redraws the shape in a detected bounding box gets the same pixels back.
"cross" is a diagonal cross (an X): an upright plus drawn 7 px wide overlaps a 7 px circle with IoU 0.89,
too close to tell apart.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from bench import BenchError

from .prompts import COLORS, SHAPES, validate_prompt

# GenEval's crop background, "#999" (evaluate_images.py, option 'bgcolor').
BACKGROUND = (153, 153, 153)
# One sRGB prototype per GenEval colour name, chosen so that every pair, and each against the #999
# background, is at least 36.8 CIELAB units apart (closest: white vs background; blue vs purple: 46).
PALETTE = {
    "red": (220, 30, 30), "orange": (255, 140, 0), "yellow": (250, 225, 20), "green": (30, 160, 50),
    "blue": (30, 70, 220), "purple": (128, 0, 128), "pink": (250, 130, 200), "brown": (120, 70, 25),
    "black": (10, 10, 10), "white": (255, 255, 255),
}
assert tuple(PALETTE) == COLORS
SIZES = (7, 8, 9, 10)   # object box sides in px at 32x32 (diffusion.md 5.2: objects 7-10 px)
GAP = 2                 # px of background kept between any two boxes
MARGIN = 1              # px kept free at the image border
RENDER_SHRINK = 0.2     # position shrink used when placing (the rule's is 0.1): relations hold with room


@lru_cache(maxsize=None)
def shape_mask(shape: str, w: int, h: int) -> np.ndarray:
    """The boolean [h, w] mask of ``shape`` filling a w x h box (read-only, cached)."""
    x = (np.arange(w) + 0.5) / w * 2 - 1
    y = (np.arange(h) + 0.5) / h * 2 - 1
    X, Y = np.meshgrid(x, y)
    if shape == "square":
        m = np.ones((h, w), bool)
    elif shape == "circle":
        m = X ** 2 + Y ** 2 <= 1
    elif shape == "ring":  # inner radius half the outer one
        r2 = X ** 2 + Y ** 2
        m = (r2 <= 1) & (r2 >= 0.25)
    elif shape == "triangle":  # apex up; the half-pixel floor keeps the apex pixel for even widths
        m = np.abs(X) <= np.maximum((Y + 1) / 2, 1 / w)
    elif shape == "diamond":
        m = np.abs(X) + np.abs(Y) <= 1
    elif shape == "cross":  # the two diagonals, 0.36 of the half-box thick
        m = np.abs(np.abs(X) - np.abs(Y)) <= 0.36
    else:
        raise BenchError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")
    m.setflags(write=False)
    return m


def render_objects(objects: list[dict], size: int = 32) -> np.ndarray:
    """Draw ``objects`` (dicts with 'class', 'color', 'box' = (x0, y0, x1, y1), x1/y1 exclusive) on the
    grey canvas; later objects paint over earlier ones where boxes overlap."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        if obj["color"] not in PALETTE:
            raise BenchError(f"unknown colour {obj['color']!r}; valid: {', '.join(COLORS)}")
        img[y0:y1, x0:x1][shape_mask(obj["class"], x1 - x0, y1 - y0)] = PALETTE[obj["color"]]
    return img


def _position_ok(rel: str, ax, ay, s, box_b) -> np.ndarray:
    """Where a box of side s at (ax, ay) (arrays) holds ``rel`` to ``box_b`` under GenEval's position rule
    with the stricter ``RENDER_SHRINK``."""
    bx0, by0, bx1, by1 = box_b
    ox = ax + s / 2 - (bx0 + bx1) / 2
    oy = ay + s / 2 - (by0 + by1) / 2
    norm = np.maximum(np.hypot(ox, oy), 1e-9)
    sx = np.maximum(np.abs(ox) - RENDER_SHRINK * (s + bx1 - bx0), 0) * np.sign(ox) / norm
    sy = np.maximum(np.abs(oy) - RENDER_SHRINK * (s + by1 - by0), 0) * np.sign(oy) / norm
    return {"left of": sx < -0.5, "right of": sx > 0.5, "above": sy < -0.5, "below": sy > 0.5}[rel]


def _place(meta: dict, rng: np.random.Generator, size: int) -> list[dict] | None:
    """One attempt at a layout for ``meta``; None when some object found no free spot."""
    placed: list[dict] = []
    groups: list[list[tuple]] = []
    for clause in meta["include"]:
        group = []
        for _ in range(clause["count"]):
            s = int(SIZES[rng.integers(len(SIZES))])
            span = np.arange(MARGIN, size - MARGIN - s + 1)
            if span.size == 0:
                return None
            ax, ay = np.meshgrid(span, span)
            ok = np.ones(ax.shape, bool)
            for other in placed:
                x0, y0, x1, y1 = other["box"]
                ok &= (ax + s + GAP <= x0) | (ax >= x1 + GAP) | (ay + s + GAP <= y0) | (ay >= y1 + GAP)
            if "position" in clause:
                rel, target = clause["position"]
                for box_b in groups[target]:
                    ok &= _position_ok(rel, ax, ay, s, box_b)
            free = np.flatnonzero(ok)
            if free.size == 0:
                return None
            k = free[rng.integers(free.size)]
            x0, y0 = int(ax.flat[k]), int(ay.flat[k])
            color = clause.get("color") or COLORS[rng.integers(len(COLORS))]
            box = (x0, y0, x0 + s, y0 + s)
            placed.append({"class": clause["class"], "color": color, "box": box})
            group.append(box)
        groups.append(group)
    return placed


def layout(meta: dict, rng: np.random.Generator, size: int = 32, attempts: int = 100) -> list[dict]:
    """The objects ('class', 'color', 'box') of a scene satisfying ``meta``, drawn from ``rng``."""
    validate_prompt(meta, "render", classes=SHAPES)
    for _ in range(attempts):
        objects = _place(meta, rng, size)
        if objects is not None:
            return objects
    raise BenchError(f"could not lay out {meta.get('prompt')!r} on a {size}x{size} canvas in {attempts} "
                     f"attempts (too many or too constrained objects for this size)")


def render(meta: dict, rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, list[dict]]:
    """A uint8 [size, size, 3] scene that satisfies the prompt ``meta``, and its objects."""
    objects = layout(meta, rng, size)
    return render_objects(objects, size), objects


def render_batch(metas: list[dict], rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Scenes for many prompts as one uint8 [N, size, size, 3] array (about 0.1 ms per scene)."""
    out = np.empty((len(metas), size, size, 3), np.uint8)
    for i, meta in enumerate(metas):
        out[i] = render_objects(layout(meta, rng, size), size)
    return out
