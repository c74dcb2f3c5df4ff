"""The sam task family's data, prompts and metrics (tasks/sam/data.py, prompts.py, metrics.py).

Expected values are worked out by hand in the comments (or with plain numpy/pycocotools), never with the
functions under test. Tests marked ``needs_data`` read the real files from the data root (``BENCH_DATA``, else
../shared/data) and skip when it is absent.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from bench import BenchError
from bench.tasks.sam import data, metrics, prompts


def rect(shape, rows, cols):  # rows[0]..rows[1] x cols[0]..cols[1], inclusive
    m = np.zeros(shape, bool)
    m[rows[0]: rows[1] + 1, cols[0]: cols[1] + 1] = True
    return m


def rle_counts(mask):
    """COCO's uncompressed RLE: run lengths of the column-major pixels, starting with a run of zeros."""
    flat = np.asarray(mask, np.uint8).flatten(order="F")
    ends = np.r_[np.flatnonzero(np.diff(flat)) + 1, flat.size]
    return ([0] if flat[0] else []) + np.diff(np.r_[0, ends]).tolist()


def test_resize_longest_and_coordinate_transforms():
    assert prompts.resize_longest(480, 640, 1024) == (768, 1024)   # scale 1.6 exactly
    assert prompts.resize_longest(427, 640, 1024) == (683, 1024)   # 427 * 1.6 = 683.2
    assert prompts.resize_longest(500, 333, 1024) == (1024, 682)   # 333 * 2.048 = 681.98
    assert prompts.resize_longest(3, 4, 6) == (5, 6)               # 4.5 -> 5 (Python's round would give 4)
    # 427 x 640 -> 683 x 1024: x scales by 1024/640 = 1.6, y by 683/427; 213.5 = 427/2 -> 683/2 = 341.5.
    np.testing.assert_allclose(prompts.transform_coords([[320.0, 213.5], [0, 0]], (427, 640), 1024),
                               [[512.0, 341.5], [0, 0]])
    np.testing.assert_allclose(prompts.transform_boxes([0, 0, 640, 427], (427, 640), 1024), [0, 0, 1024, 683])
    # 3 x 4 -> 5 x 6 (the rounding case above): x scales by 6/4 = 1.5, y by 5/3.
    np.testing.assert_allclose(prompts.transform_boxes([[2, 3, 4, 3]], (3, 4), 6), [[3, 5, 6, 5]])
    with pytest.raises(BenchError, match="xyxy"):
        prompts.transform_boxes([1, 2, 3], (10, 10), 20)


def test_sam_input_normalises_then_pads_with_zeros():
    img = np.full((2, 4, 3), 200, np.uint8)   # constant: bilinear resizing keeps it constant
    x = prompts.sam_input(img, 8)             # -> 4 x 8 content, rows 4..7 padding
    assert x.shape == (3, 8, 8) and x.dtype == np.float32
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    np.testing.assert_allclose(x[:, :4], np.broadcast_to(((200 - mean) / std)[:, None, None], (3, 4, 8)), rtol=1e-6)
    assert np.all(x[:, 4:] == 0)              # padding after normalisation: 0, not (0 - mean) / std


def test_resize_pad_mask_by_hand():
    blocks = np.array([[1, 0, 1, 1], [0, 1, 0, 0]], bool)
    mask = np.kron(blocks, np.ones((2, 2), bool))   # 4 x 8 of 2x2 blocks; halving keeps the block pattern
    out = prompts.resize_pad_mask(mask, 4)
    assert out.shape == (4, 4) and out.dtype == bool
    np.testing.assert_array_equal(out, np.r_[blocks, np.zeros((2, 4), bool)])


def test_center_point_by_hand():
    # 5x5 square at rows/cols 2..6: the centre (4, 4) is 3 px from the background on every side.
    assert prompts.center_point(rect((9, 9), (2, 6), (2, 6))) == (4.0, 4.0)
    # 5 rows x 7 cols at rows 2..6, cols 2..8 of 9 x 11: row 4 is 3 from rows 1/7; cols 4, 5, 6 are >= 3 from
    # cols 1/9, so distance 3 is reached at (x=4,5,6, y=4): the first in row-major order is x = 4.
    assert prompts.center_point(rect((9, 11), (2, 6), (2, 8))) == (4.0, 4.0)
    # Vertical bar cols 1..3 x rows 1..8, horizontal bar rows 4..8 x cols 1..8, in 10 x 10. Inside the thick
    # bar, row 6 is 3 from row 9 (and from row 3 where col >= 4); col 3 is 3 from col 0 and sqrt(10) from the
    # corner (3, 4); cols 3..6 reach 3, col 7 only 2 (col 9); the thin bar reaches 2. Max 3, first at (x=3, y=6).
    m = rect((10, 10), (1, 8), (1, 3)) | rect((10, 10), (4, 8), (1, 8))
    assert prompts.center_point(m) == (3.0, 6.0)
    # A 5x5 block in the top-left corner of a 5 x 8 image touches the top, left and bottom borders. With the
    # border as background its centre (2, 2) is 3 from everything; without it col 0 would be 5 from col 5.
    assert prompts.center_point(rect((5, 8), (0, 4), (0, 4))) == (2.0, 2.0)
    with pytest.raises(BenchError, match="empty"):
        prompts.center_point(np.zeros((4, 4), bool))


def test_next_point_by_hand():
    gt = rect((10, 10), (1, 7), (1, 7))
    pred = rect((10, 10), (1, 7), (1, 3))
    pred[9, 9] = True   # a 1-px false positive on the border: distance 1
    # FN = rows 1..7 x cols 4..7: col 5 is 2 from col 3 (predicted), col 6 is 2 from col 8; rows 2..6 are >= 2
    # from rows 0/8. Max 2 > 1, first at (x=5, y=2); label 1.
    assert prompts.next_point(gt, pred) == ((5.0, 2.0), 1)

    gt = rect((12, 12), (1, 3), (1, 3))
    pred = gt.copy()
    pred[2, 2] = False                       # FN: one pixel, distance 1
    pred |= rect((12, 12), (6, 10), (6, 10))  # FP: a 5x5 block, distance 3 at its centre (8, 8)
    assert prompts.next_point(gt, pred) == ((8.0, 8.0), 0)
    # Equal maxima (two 3x3 blocks, both 2 at their centres) -> the false positive, as RITM's strict '>'.
    a, b = rect((10, 10), (1, 3), (1, 3)), rect((10, 10), (5, 7), (5, 7))
    assert prompts.next_point(a, b) == ((6.0, 6.0), 0)
    # No error at all: a foreground click at the gt's centre.
    assert prompts.next_point(a, a) == ((2.0, 2.0), 1)


def test_boxes():
    assert prompts.mask_box(rect((10, 10), (2, 5), (3, 8))) == (3.0, 2.0, 9.0, 6.0)
    assert prompts.coco_box_xyxy([388.66, 69.92, 109.41, 277.62]) == pytest.approx((388.66, 69.92, 498.07, 347.54))
    with pytest.raises(BenchError, match="x, y, width, height"):
        prompts.coco_box_xyxy([1, 2, 3])
    with pytest.raises(BenchError, match="empty"):
        prompts.mask_box(np.zeros((3, 3)))


def test_mask_iou_and_mean_iou_by_hand():
    pred = rect((5, 5), (0, 1), (0, 2))   # 6 px
    gt = rect((5, 5), (1, 3), (1, 3))     # 9 px; overlap row 1, cols 1..2 = 2 px; union 13
    assert metrics.mask_iou(pred, gt) == pytest.approx(2 / 13)
    assert metrics.mask_iou(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    assert metrics.mask_iou(np.zeros((3, 3)), np.ones((3, 3))) == 0.0
    with pytest.raises(BenchError, match="shape"):
        metrics.mask_iou(np.zeros((3, 3)), np.zeros((3, 4)))
    assert metrics.mean_iou([0.5, 1.0, 0.0]) == pytest.approx(0.5)
    with pytest.raises(BenchError, match="no IoUs"):
        metrics.mean_iou([])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools decode vs numpy 2
def test_encode_rle_by_hand():
    from pycocotools import mask as mask_utils

    # Column-major pixels of [[0, 1], [1, 1]]: 0, 1, 1, 1 -> runs [1, 3]; small counts are chr(48 + n): "13".
    rle = metrics.encode_rle(np.array([[0, 1], [1, 1]], bool))
    assert rle == {"size": [2, 2], "counts": "13"}
    m = rect((7, 5), (1, 4), (2, 3))
    back = mask_utils.decode({"size": [7, 5], "counts": metrics.encode_rle(m)["counts"].encode()})
    np.testing.assert_array_equal(back.astype(bool), m)


def tiny_gt():
    """One 32 x 32 image: A (6x6 = 36 px), B (5x5 = 25 px) and a crowd region C (4x8 = 32 px), all COCO-small."""
    spans = {1: ((2, 7), (2, 7)), 2: ((15, 19), (15, 19)), 3: ((26, 29), (2, 9))}   # rows, cols
    masks = {k: rect((32, 32), r, c) for k, (r, c) in spans.items()}
    anns = [{"id": k, "image_id": 1, "category_id": 1, "iscrowd": int(k == 3), "area": int(masks[k].sum()),
             "bbox": [c[0], r[0], c[1] - c[0] + 1, r[1] - r[0] + 1],
             "segmentation": {"size": [32, 32], "counts": rle_counts(masks[k])}} for k, (r, c) in spans.items()]
    gt = {"images": [{"id": 1, "file_name": "a.jpg", "height": 32, "width": 32}], "annotations": anns,
          "categories": [{"id": 1, "name": "thing", "supercategory": "thing"}]}
    return gt, masks


def tiny_predictions(masks):
    b_pred = rect((32, 32), (15, 18), (15, 18))   # 4x4 inside B: IoU 16/25 = 0.64
    return [{"image_id": 1, "category_id": 1, "segmentation": metrics.encode_rle(m), "score": sc}
            for m, sc in ((b_pred, 0.95), (masks[1], 0.9), (masks[3], 0.85))]


def test_coco_mask_ap_by_hand_and_against_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, masks = tiny_gt()
    preds = tiny_predictions(masks)
    before_gt, before_preds = json.dumps(gt), json.dumps(preds)
    got = metrics.coco_mask_ap(gt, preds)
    # The crowd prediction matches C (IoU with a crowd region is inter / det area = 1) and is ignored; A is a
    # perfect match. B's prediction (ranked first) matches at IoU thresholds 0.50, 0.55, 0.60 (0.64 >= t):
    # precision 1 up to recall 1, AP_t = 1. At 0.65..0.95 (7 thresholds) it is a false positive ahead of A:
    # precision 0 then 1/2 at recall 1/2, made non-increasing -> 1/2 at COCO's 51 recall points 0, 0.01, ..,
    # 0.50 and 0 at the other 50 (recall-limited by the missed B): AP_t = 0.5 * 51/101.
    ap = (3 * 1.0 + 7 * 0.5 * 51 / 101) / 10
    assert got["AP"] == pytest.approx(ap)
    assert got["AP50"] == pytest.approx(1.0)
    assert got["AP75"] == pytest.approx(0.5 * 51 / 101)
    assert got["APs"] == pytest.approx(ap)          # every object is small (area < 32^2)
    assert got["APm"] == -1.0 and got["APl"] == -1.0  # pycocotools' marker: no gt in that range
    assert json.dumps(gt) == before_gt and json.dumps(preds) == before_preds   # inputs untouched

    # pycocotools' own path: GT and results as JSON files, COCO / loadRes / COCOeval.
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(preds))
    coco = COCO(str(tmp_path / "gt.json"))
    ev = COCOeval(coco, coco.loadRes(str(tmp_path / "dt.json")), "segm")
    for step in (ev.evaluate, ev.accumulate, ev.summarize):
        step()
    assert [got[k] for k in metrics.AP_KEYS] == pytest.approx(list(ev.stats[:6]))


def test_coco_mask_ap_edge_cases():
    gt, masks = tiny_gt()
    assert metrics.coco_mask_ap(gt, []) == {k: 0.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    # A prediction carrying a bbox is scored by its mask alone (TinySAM's script drops the box).
    # (With the box, loadRes would set each detection's area to 64^2, "medium": the unmatched B prediction
    # would be ignored in APs, which would rise to (3 + 7 * 51/101) / 10.)
    got = metrics.coco_mask_ap(gt, [{**p, "bbox": [0, 0, 64, 64]} for p in tiny_predictions(masks)])
    assert got["AP"] == got["APs"] == pytest.approx((3 + 7 * 0.5 * 51 / 101) / 10)
    with pytest.raises(BenchError, match="image ids"):
        metrics.coco_mask_ap(gt, [{**tiny_predictions(masks)[0], "image_id": 7}])


def test_shapes_scene_is_deterministic_and_exact():
    a, b = (data.shapes_scene(np.random.default_rng(3), 64, 8) for _ in range(2))
    np.testing.assert_array_equal(a.image, b.image)
    assert [(i.box, i.mask.tobytes()) for i in a.instances] == [(i.box, i.mask.tobytes()) for i in b.instances]
    assert not np.array_equal(a.image, data.shapes_scene(np.random.default_rng(4), 64, 8).image)
    s = data.shapes_scene(np.random.default_rng(0), 32, 0, background=np.full((10, 20, 3), 7, np.uint8))
    assert s.instances == [] and np.all(s.image == 7) and s.image.shape == (32, 32, 3)   # resized background
    # On a black background every drawn pixel is non-black (max channel >= 100, noise sigma <= 12): the union
    # of the masks must be exactly the drawn pixels, and the masks disjoint.
    for seed in range(5):
        s = data.shapes_scene(np.random.default_rng(seed), 48, 10, background=np.zeros((48, 48, 3), np.uint8))
        stack = np.stack([i.mask for i in s.instances])
        assert stack.sum(0).max() <= 1
        np.testing.assert_array_equal(stack.any(0), s.image.any(2))
        for inst in s.instances:
            assert inst.mask.sum() >= 16 and inst.category_id in (1, 2, 3)
            rows, cols = np.nonzero(inst.mask.any(1))[0], np.nonzero(inst.mask.any(0))[0]
            assert inst.box == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)


def test_object_like_scenes_are_exact_composites_of_textured_parts():
    # textures: six photographs of one distinct bright colour each (a resized constant image stays exactly that
    # colour), on a black background. Masks must be disjoint and cover exactly the drawn pixels; textured parts
    # must show the photographs' colours; and objects made of parts must exist: one instance mask holding two
    # photographs' colours (two parts filled separately, one instance).
    colours = np.array([[200, 100, 100], [100, 200, 100], [100, 100, 200], [250, 250, 120], [120, 250, 250],
                        [250, 120, 250]], np.uint8)
    textures = np.broadcast_to(colours[:, None, None, :], (6, 8, 8, 3)).copy()
    composite = textured = flat = 0
    for seed in range(12):
        a, b = (data.shapes_scene(np.random.default_rng(seed), 64, 6, background=np.zeros((64, 64, 3), np.uint8),
                                  textures=textures) for _ in range(2))
        np.testing.assert_array_equal(a.image, b.image)
        stack = np.stack([i.mask for i in a.instances])
        assert stack.sum(0).max() <= 1
        np.testing.assert_array_equal(stack.any(0), a.image.any(2))
        for inst in a.instances:
            assert inst.mask.sum() >= 16 and inst.category_id in (1, 2, 3, 4)
            rows, cols = np.nonzero(inst.mask.any(1))[0], np.nonzero(inst.mask.any(0))[0]
            assert inst.box == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
            px = a.image[inst.mask]
            hits = [(px == c).all(1).sum() for c in colours]
            textured += sum(hits)
            composite += sum(h >= 8 for h in hits) >= 2
            flat += int(sum(hits) < len(px))
    assert textured > 5000 and composite >= 3 and flat >= 3
    plain = data.shapes_scene(np.random.default_rng(3), 64, 8)
    assert all(i.category_id in (1, 2, 3) for i in plain.instances)  # blobs (4) only in object-like scenes


def test_shapes_scene_later_shapes_occlude_earlier_ones():
    # The first 5 shapes of a 6-shape scene are the 5-shape scene's (same draws in the same order); the 6th is
    # drawn on top: its mask is exactly where the two images differ, and it takes its pixels from the others.
    checked = 0
    for seed in range(8):
        five, six = (data.shapes_scene(np.random.default_rng(seed), 48, n) for n in (5, 6))
        if [i.ann_id for i in six.instances] != [i.ann_id for i in five.instances] + [6]:
            continue  # occlusion dropped a shape (or the 6th was too small): not this test's case
        top = six.instances[-1].mask
        np.testing.assert_array_equal(top, (five.image != six.image).any(2))
        for x, y in zip(five.instances, six.instances):
            np.testing.assert_array_equal(y.mask, x.mask & ~top)
        checked += 1
    assert checked >= 3


def write_coco_root(root, image_hw=(6, 8)):
    # One grey 6 x 8 PNG (or image_hw, against its 6 x 8 entry) and one crowd annotation in RLE.
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.full(image_hw, 90, np.uint8)).save(root / "images" / "a.png")
    m = rect((6, 8), (1, 3), (2, 6))
    gt = {"images": [{"id": 1, "file_name": "a.png", "height": 6, "width": 8}],
          "annotations": [{"id": 5, "image_id": 1, "category_id": 2, "iscrowd": 1, "area": 15, "bbox": [2, 1, 5, 3],
                           "segmentation": {"size": [6, 8], "counts": rle_counts(m)}}],
          "categories": [{"id": 2, "name": "x"}]}
    (root / "instances.json").write_text(json.dumps(gt))
    return m


def test_load_coco_subset_tiny_root_and_bad_inputs(tmp_path):
    m = write_coco_root(tmp_path / "coco")
    (s,), gt = data.load_coco_subset(tmp_path / "coco")
    assert s.image.shape == (6, 8, 3) and s.image.dtype == np.uint8 and np.all(s.image == 90)   # grey -> RGB
    (inst,) = s.instances
    np.testing.assert_array_equal(inst.mask, m)
    assert (inst.box, inst.category_id, inst.ann_id, inst.iscrowd) == ((2, 1, 7, 4), 2, 5, True)
    # Bad roots: no instances.json, a missing image, an image of another size than its entry, missing keys.
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchError, match=r"empty[/\\]instances\.json not found"):
        data.load_coco_subset(tmp_path / "empty")
    write_coco_root(tmp_path / "gone")
    (tmp_path / "gone" / "images" / "a.png").unlink()
    with pytest.raises(BenchError, match=r"images[/\\]a\.png not found"):
        data.load_coco_subset(tmp_path / "gone")
    write_coco_root(tmp_path / "size", image_hw=(7, 8))
    with pytest.raises(BenchError, match="7x8"):
        data.load_coco_subset(tmp_path / "size")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "instances.json").write_text('{"images": []}')
    with pytest.raises(BenchError, match="annotations"):
        data.load_coco_subset(tmp_path / "broken")


def test_panoptic_png_of_wrong_shape(tmp_path):
    root = tmp_path / "pan"
    for d in ("images", "panoptic"):
        (root / d).mkdir(parents=True)
    for h, f in ((4, "images/a.jpg"), (5, "panoptic/a.png")):
        Image.fromarray(np.zeros((h, 6, 3), np.uint8)).save(root / f)
    (root / "panoptic_coco_categories.json").write_text(json.dumps([{"id": 1, "isthing": 1}]))
    (root / "panoptic_examples.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "height": 4, "width": 6}],
        "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": []}]}))
    with pytest.raises(BenchError, match=r"a\.png is 5x6 .* is 4x6"):
        data.load_coco_panoptic_sample(root)


def test_scene_from_labels_and_nuclei_errors(monkeypatch):
    with pytest.raises(BenchError, match=r"\(4, 5\) differs from image shape \(4, 4\)"):
        data.scene_from_labels(np.zeros((4, 4)), np.zeros((4, 5), np.uint16))

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", absent)
    with pytest.raises(BenchError, match="pip install --no-deps stardist"):
        data.load_nuclei()

    labels = np.array([[0, 3, 3], [0, 0, 9], [9, 9, 9]], np.uint16)
    s = data.scene_from_labels(np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8]], np.float32) * 10, labels)
    assert [i.ann_id for i in s.instances] == [3, 9]
    assert s.instances[0].box == (1, 0, 3, 1) and s.instances[1].box == (0, 1, 3, 3)
    assert s.image.shape == (3, 3, 3) and s.image[0, 0, 0] == 0 and s.image[2, 2, 0] == 255


@pytest.fixture(scope="module")
def coco_subset(data_root):
    root = data_root / "coco_val_subset"
    if not (root / "instances.json").is_file():
        pytest.skip(f"coco_val_subset not found under {data_root}")
    return data.load_coco_subset(root)


@pytest.mark.needs_data
def test_coco_subset_real(coco_subset, data_root):
    scenes, gt = coco_subset
    assert len(scenes) == 206
    assert [s.image_id for s in scenes] == sorted(im["id"] for im in gt["images"])
    insts = [i for s in scenes for i in s.instances]
    assert len(insts) == 1786 and sum(i.iscrowd for i in insts) == 21
    for s, im in zip(scenes, sorted(gt["images"], key=lambda im: im["id"])):
        assert s.image.dtype == np.uint8 and s.image.shape == (im["height"], im["width"], 3)
        assert all(i.mask.shape == s.image.shape[:2] for i in s.instances)
    # SOURCES.md's spot check: ann 200887, a person in 000000397133.jpg, bbox [388.66, 69.92, 109.41, 277.62].
    (person,) = [i for i in insts if i.ann_id == 200887]
    assert person.box == pytest.approx((388.66, 69.92, 498.07, 347.54))
    ys, xs = np.nonzero(person.mask)
    assert abs(xs.min() - 388.66) <= 1 and abs(xs.max() + 1 - 498.07) <= 1 and abs(ys.max() + 1 - 347.54) <= 1
    few, few_gt = data.load_coco_subset(data_root / "coco_val_subset", limit=3)   # the first 3 images by id
    assert [s.image_id for s in few] == [s.image_id for s in scenes[:3]] == [im["id"] for im in few_gt["images"]]
    assert sorted(a["id"] for a in few_gt["annotations"]) == sorted(i.ann_id for s in scenes[:3] for i in s.instances)


@pytest.mark.needs_data
def test_coco_subset_gt_as_predictions_scores_ap_one(coco_subset):
    scenes, gt = coco_subset
    preds = [{"image_id": s.image_id, "category_id": i.category_id, "segmentation": metrics.encode_rle(i.mask),
              "score": 1.0} for s in scenes for i in s.instances if not i.iscrowd]
    assert metrics.coco_mask_ap(gt, preds) == pytest.approx({k: 1.0 for k in metrics.AP_KEYS})


@pytest.mark.needs_data
def test_coco_panoptic_sample_real(data_root):
    root = data_root / "coco_sample"
    scenes = data.load_coco_panoptic_sample(root)
    ann = json.loads((root / "panoptic_examples.json").read_text())
    things = {c["id"] for c in json.loads((root / "panoptic_coco_categories.json").read_text()) if c["isthing"]}
    assert [s.image_id for s in scenes] == [a["image_id"] for a in ann["annotations"]] == [142238, 439180]
    for s, a in zip(scenes, ann["annotations"]):
        segs = {g["id"]: g for g in a["segments_info"] if g["category_id"] in things}
        assert [i.ann_id for i in s.instances] == list(segs)
        png = np.asarray(Image.open(root / "panoptic" / a["file_name"]).convert("RGB")).astype(np.int64)
        ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
        for inst in s.instances:
            seg = segs[inst.ann_id]
            assert inst.mask.sum() == seg["area"] and np.array_equal(inst.mask, ids == seg["id"])
            x, y, w, h = seg["bbox"]
            assert inst.box == (x, y, x + w, y + h) and inst.iscrowd == bool(seg["iscrowd"])
        assert s.image.shape == (*ids.shape, 3)


@pytest.mark.needs_data
def test_nuclei_real():
    tifffile = pytest.importorskip("tifffile")
    if importlib.util.find_spec("stardist") is None:
        pytest.skip("stardist is not installed (pip install --no-deps stardist)")
    s = data.load_nuclei()
    assert s.image.shape == (512, 512, 3) and s.image.dtype == np.uint8 and len(s.instances) == 125
    assert np.array_equal(s.image[..., 0], s.image[..., 1]) and np.array_equal(s.image[..., 0], s.image[..., 2])
    files = {f.name: f.locate() for f in importlib.metadata.files("stardist")}
    raw, labels = tifffile.imread(files["img2d.tif"]).astype(float), tifffile.imread(files["mask2d.tif"])
    lo, hi = np.percentile(raw, 1), np.percentile(raw, 99.8)
    want = np.round(np.clip((raw - lo) / (hi - lo), 0, 1) * 255)
    np.testing.assert_array_equal(s.image[..., 0], want)
    stack = np.stack([i.mask for i in s.instances])
    assert stack.sum(0).max() == 1 and np.array_equal(stack.any(0), labels > 0)
    assert [i.ann_id for i in s.instances] == sorted(set(labels.ravel().tolist()) - {0})


@pytest.mark.needs_data
def test_cifar_backgrounds_real(data_root, tmp_path):
    got = data.cifar_backgrounds(data_root, 3, seed=5, size=48)
    assert got.shape == (3, 48, 48, 3) and got.dtype == np.uint8
    # The documented rule: sorted train/ JPEGs, picked by default_rng(seed) without replacement, PIL bicubic.
    with zipfile.ZipFile(data_root / "cifar10" / "cifar10_jpeg.zip") as zf:
        names = sorted(n for n in zf.namelist() if n.startswith("train/") and n.endswith(".jpg"))
        assert len(names) == 50000
        for img, j in zip(got, np.random.default_rng(5).choice(50000, 3, replace=False)):
            want = Image.open(zf.open(names[j])).convert("RGB").resize((48, 48), Image.BICUBIC)
            np.testing.assert_array_equal(img, np.asarray(want))
    assert not np.array_equal(got, data.cifar_backgrounds(data_root, 3, seed=6, size=48))
    with pytest.raises(BenchError, match=r"cifar10_jpeg\.zip"):
        data.cifar_backgrounds(tmp_path, 1, 0, 32)
