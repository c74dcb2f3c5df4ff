"""The shape renderer and the programmatic detector, and the detector's validation gates.

The gates (docs/reference/diffusion.md, section 5.2) run every shape prompt through GenEval's rules on
several renders each; run with ``-s`` to see the table the integrator reports.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
from scipy import ndimage

from bench import BenchError
from bench.tasks.geneval.detect import Detection, color_name, detect
from bench.tasks.geneval.prompts import CATEGORIES, COLORS, SHAPES, shape_prompts, train_prompts
from bench.tasks.geneval.render import (
    BACKGROUND, GAP, PALETTE, SIZES, layout, render, render_batch, render_objects, shape_mask,
)
from bench.tasks.geneval.rules import evaluate_detections, relative_position, summarize

RENDERS_PER_PROMPT = 3
SIZE = 32


def _score(meta, image):
    return evaluate_detections(meta, detect(image))


def _mirror(objects, rel):
    """The same objects with their boxes reflected across the image's vertical (left/right relations) or
    horizontal (above/below) midline: the shapes are redrawn upright, only the layout is mirrored."""
    out = []
    for o in objects:
        x0, y0, x1, y1 = o["box"]
        horizontal = rel in ("left of", "right of")
        box = (SIZE - x1, y0, SIZE - x0, y1) if horizontal else (x0, SIZE - y1, x1, SIZE - y0)
        out.append({**o, "box": box})
    return out


@pytest.fixture(scope="module")
def gates():
    """Per-category accuracy of each variant over all shape prompts x RENDERS_PER_PROMPT renders."""
    rng = np.random.default_rng(0)
    blank = np.full((SIZE, SIZE, 3), BACKGROUND, np.uint8)
    blank_dets = detect(blank)
    res = defaultdict(list)
    for meta in shape_prompts():
        for _ in range(RENDERS_PER_PROMPT):
            image, objects = render(meta, rng, SIZE)
            res["ground truth"].append(_score(meta, image))
            noisy = np.clip(np.rint(image + rng.normal(0, 4, image.shape)), 0, 255).astype(np.uint8)
            res["noise 4/255"].append(_score(meta, noisy))
            blurred = ndimage.gaussian_filter(image.astype(np.float64), (0.5, 0.5, 0))
            res["blur 0.5 px"].append(_score(meta, np.clip(np.rint(blurred), 0, 255).astype(np.uint8)))
            res["uniform noise"].append(_score(meta, rng.integers(0, 256, image.shape, dtype=np.uint8)))
            res["blank grey"].append(evaluate_detections(meta, blank_dets))
            if meta["tag"] == "color_attr":
                a, b = meta["include"]
                swapped = {**meta, "include": [{**a, "color": b["color"]}, {**b, "color": a["color"]}]}
                res["swapped colours"].append(_score(meta, render(swapped, rng, SIZE)[0]))
            if meta["tag"] == "position":
                rel = meta["include"][1]["position"][0]
                res["mirrored layout"].append(_score(meta, render_objects(_mirror(objects, rel), SIZE)))
            if meta["tag"] == "counting":
                (c,) = meta["include"]
                for n in (c["count"] - 1, c["count"] + 1):
                    wrong = {**meta, "include": [{**c, "count": n}]}
                    res["wrong count"].append(_score(meta, render(wrong, rng, SIZE)[0]))
    table = {k: summarize(v) for k, v in res.items()}
    print("\nGenEval-like detector validation (accuracy per category; "
          f"{RENDERS_PER_PROMPT} renders of each of {len(shape_prompts())} prompts)")
    print(f"{'variant':<16}" + "".join(f"{c:>14}" for c in (*CATEGORIES, "overall")))
    for k, s in table.items():
        cells = (f"{s[c]:>14.3f}" if c in s else " " * 14 for c in (*CATEGORIES, "overall"))
        print(f"{k:<16}" + "".join(cells))
    return table


def test_gate_ground_truth_renders_pass(gates):
    for cat in CATEGORIES:
        assert gates["ground truth"][cat] >= 0.99, cat


def test_gate_noise_and_blank_images_fail(gates):
    for variant in ("uniform noise", "blank grey"):
        for cat in CATEGORIES:
            assert gates[variant][cat] <= 0.02, (variant, cat)


def test_gate_swapped_colours_and_mirrored_layouts_fail(gates):
    assert gates["swapped colours"]["color_attr"] == 0.0
    assert gates["mirrored layout"]["position"] == 0.0
    assert gates["wrong count"]["counting"] == 0.0


def test_gate_stable_under_mild_noise(gates):
    for cat in CATEGORIES:
        assert gates["noise 4/255"][cat] >= 0.97, cat


def test_blurred_edges_are_read_as_blends(gates):
    """Not one of the reference note's gates: edge pixels blended with the background (a 0.5 px Gaussian
    blur) still give the right shapes, as generated images will need."""
    for cat in CATEGORIES:
        assert gates["blur 0.5 px"][cat] >= 0.95, cat


def test_colour_is_named_with_the_edge_blends_undone():
    img = render_objects([])
    red, grey = np.array(PALETTE["red"], float), np.array(BACKGROUND, float)
    img[5:14, 5:14] = np.rint(grey + 0.6 * (red - grey))  # a red square, two thirds of it blended edges
    img[7:12, 7:12] = PALETTE["red"]
    assert color_name(grey + 0.6 * (red - grey)) == "brown"  # the raw median colour would be brown
    (det,) = detect(img)
    assert (det.cls, det.color, det.box) == ("square", "red", (5, 5, 14, 14))
    assert det.score == pytest.approx(1.0)


def test_ambiguous_shapes_get_low_scores():
    img = render_objects([{"class": "square", "color": "blue", "box": (5, 5, 14, 14)}])
    for y, x in [(5, 5), (5, 13), (13, 5), (13, 13)]:
        img[y, x] = BACKGROUND  # corners cut: IoU 0.95 with a square, 0.90 with a circle
    (det,) = detect(img)
    assert det.cls == "square" and 0.3 < det.score < 0.9  # a detection, but not one counting accepts


def test_off_palette_and_washed_out_colours_are_not_confident_objects():
    for rgb, max_score in [((0, 128, 128), 0.0), ((100, 0, 60), 0.0), ((211, 196, 73), 0.3)]:
        img = render_objects([])
        img[5:14, 5:14] = rgb  # teal, maroon: far from every prototype; a 60 % yellow blend: washed out
        assert all(d.score <= max_score for d in detect(img)), rgb


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_colour_and_size_is_detected_exactly(shape):
    for color in COLORS:
        for s in SIZES:
            box = (5, 9, 5 + s, 9 + s)
            (det,) = detect(render_objects([{"class": shape, "color": color, "box": box}]))
            assert (det.cls, det.color, det.box) == (shape, color, box)
            assert det.score == pytest.approx(1.0) and det.mask.sum() == shape_mask(shape, s, s).sum()


def test_shape_masks_fill_their_box_and_differ():
    for s in SIZES:
        for shape in SHAPES:
            m = shape_mask(shape, s, s)
            assert m.any(0).all() and m.any(1).all(), (shape, s)  # touches all four sides
        for i, a in enumerate(SHAPES):
            for b in SHAPES[i + 1:]:
                ma, mb = shape_mask(a, s, s), shape_mask(b, s, s)
                assert (ma & mb).sum() / (ma | mb).sum() <= 0.86, (a, b, s)


def test_detector_scores_degrade_and_reject_non_shapes():
    img = render_objects([{"class": "square", "color": "red", "box": (2, 2, 12, 12)}])
    img[2:12, 12:18] = PALETTE["red"]  # a 10 x 16 red rectangle: aspect 1.6
    (det,) = detect(img)
    assert 0 < det.score < 0.9
    flat = render_objects([])
    flat[2:8, 2:14] = PALETTE["red"]  # 6 x 12: aspect 2, not an object
    assert detect(flat) == []
    # A float image in [0, 1] is accepted, a wrong shape is not.
    assert detect(np.full((8, 8, 3), 0.6)) == []
    with pytest.raises(BenchError, match=r"\[H, W, 3\]"):
        detect(np.zeros((8, 8)))
    assert color_name(PALETTE["pink"]) == "pink" and color_name((200, 40, 40)) == "red"
    assert isinstance(detect(render(shape_prompts()[0], np.random.default_rng(0))[0])[0], Detection)


def test_render_satisfies_the_prompt_and_is_deterministic():
    rng = np.random.default_rng(3)
    for meta in shape_prompts() + train_prompts(np.random.default_rng(4), 200):
        objects = layout(meta, rng)
        assert len(objects) == sum(c["count"] for c in meta["include"])
        i = 0
        groups = []
        for clause in meta["include"]:
            group = objects[i:i + clause["count"]]
            i += clause["count"]
            for o in group:
                assert o["class"] == clause["class"] and o["color"] in COLORS
                assert o["color"] == clause.get("color", o["color"])
                assert o["box"][2] - o["box"][0] in SIZES and o["box"][3] - o["box"][1] in SIZES
            if "position" in clause:
                rel, t = clause["position"]
                assert all(rel in relative_position(o["box"], b["box"]) for o in group for b in groups[t])
            groups.append(group)
        for a in range(len(objects)):
            for b in range(a + 1, len(objects)):
                p, q = objects[a]["box"], objects[b]["box"]
                assert (p[2] + GAP <= q[0] or q[2] + GAP <= p[0] or p[3] + GAP <= q[1] or q[3] + GAP <= p[1])
    meta = shape_prompts()[-1]
    one = render(meta, np.random.default_rng(7))
    two = render(meta, np.random.default_rng(7))
    assert np.array_equal(one[0], two[0]) and one[1] == two[1]
    assert one[0].dtype == np.uint8 and one[0].shape == (32, 32, 3)
    assert tuple(one[0][0, 0]) == BACKGROUND


def test_render_batch_matches_render():
    metas = shape_prompts()[:10]
    batch = render_batch(metas, np.random.default_rng(5))
    rng = np.random.default_rng(5)
    assert batch.shape == (10, 32, 32, 3)
    for meta, img in zip(metas, batch):
        assert np.array_equal(img, render(meta, rng)[0])
