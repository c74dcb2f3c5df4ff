"""GenEval's scoring rules on hand-made detection lists, each worked out by hand."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from bench import BenchError
from bench.tasks.geneval.rules import (
    Rules, box_iou, evaluate_detections, filter_detections, relative_position, summarize,
)


@dataclass
class Det:
    cls: str
    score: float
    box: tuple = (0, 0, 10, 10)
    color: str | None = None


def centred(cx, cy, w=10, h=10):
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def meta(tag, include, exclude=None):
    m = {"tag": tag, "include": include, "prompt": "p"}
    if exclude is not None:
        m["exclude"] = exclude
    return m


def correct(m, dets, **kw):
    return evaluate_detections(m, dets, **kw)["correct"]


B = centred(15, 15)  # a 10 x 10 target box


def test_position_rule_at_the_boundary():
    # Two 10 px boxes, side by side at centre distance d: shrink 0.1 * (10 + 10) = 2, so dx = -(d - 2) / d,
    # which is "left of" only when strictly below -0.5, i.e. d > 4.
    assert relative_position(centred(11, 15), B) == set()            # d = 4: dx = -0.5 exactly
    assert relative_position(centred(10, 15), B) == {"left of"}      # d = 5: dx = -0.6
    assert relative_position(centred(20, 15), B) == {"right of"}
    assert relative_position(centred(15, 9), B) == {"above"}         # y points down
    assert relative_position(centred(15, 21), B) == {"below"}
    assert relative_position(centred(13.5, 15), B) == set()          # |offset| 1.5 < shrink 2: no relation
    # Offset (-6, -3): shrunk (-4, -1) / |(-6, -3)| = (-0.596, -0.149): left of, not above.
    assert relative_position(centred(9, 12), B) == {"left of"}
    # Offset (-6, -6): shrunk (-4, -4) / 8.485 = -0.471 each: a diagonal holds neither relation.
    assert relative_position(centred(9, 9), B) == set()
    # Offset (-9, -9): (-7, -7) / 12.73 = -0.55 each: both.
    assert relative_position(centred(6, 6), B) == {"left of", "above"}
    # The shrink is per axis, from widths for x and heights for y: A 4x4 at (2, 10), B 4x40 at (8, 20):
    # offset (-6, -10), shrink (0.8, 4.4) -> (-5.2, -5.6) / 11.66 = (-0.446, -0.480): nothing.
    assert relative_position((0, 8, 4, 12), (6, 0, 10, 40)) == set()


def test_position_prompt_checks_top_objects_against_the_matched_target():
    m = meta("position", [{"class": "square", "count": 1},
                          {"class": "circle", "count": 1, "position": ["left of", 0]}])
    left, right = centred(5, 15), centred(25, 15)
    assert correct(m, [Det("square", 0.9, B), Det("circle", 0.8, left)])
    assert not correct(m, [Det("square", 0.9, B), Det("circle", 0.8, right)])
    # Only the top-count circle is checked: a weaker circle on the wrong side does not matter ...
    assert correct(m, [Det("square", 0.9, B), Det("circle", 0.8, left), Det("circle", 0.5, right)])
    # ... but the most confident one must hold the relation.
    assert not correct(m, [Det("square", 0.9, B), Det("circle", 0.5, left), Det("circle", 0.8, right)])
    # The target must have been matched.
    r = evaluate_detections(m, [Det("circle", 0.8, left)])
    assert not r["correct"] and "no matched target" in r["reason"]
    # With two targets (count 2), the circle must be left of both.
    m2 = meta("position", [{"class": "square", "count": 2},
                           {"class": "circle", "count": 1, "position": ["left of", 0]}])
    assert correct(m2, [Det("square", 0.9, B), Det("square", 0.9, centred(30, 15)), Det("circle", 0.8, left)])
    assert not correct(m2, [Det("square", 0.9, B), Det("square", 0.9, centred(0, 15)),
                            Det("circle", 0.8, left)])


def test_counting_threshold_and_exclude_clause():
    m = meta("counting", [{"class": "circle", "count": 2}], [{"class": "circle", "count": 3}])
    two = [Det("circle", 0.95), Det("circle", 0.95)]
    assert correct(m, two)
    assert not correct(m, two + [Det("circle", 0.91)])   # a third confident circle trips the exclude
    assert correct(m, two + [Det("circle", 0.9)])        # 0.9 is not above the counting threshold
    assert not correct(m, [Det("circle", 0.95), Det("circle", 0.9)])  # ... so only one circle counts
    # Other tags use 0.3, also strictly.
    m1 = meta("two_object", [{"class": "circle", "count": 1}, {"class": "ring", "count": 1}])
    assert correct(m1, [Det("circle", 0.31), Det("ring", 0.99)])
    assert not correct(m1, [Det("circle", 0.3), Det("ring", 0.99)])
    # An exclude clause on another class counts only that class.
    mx = meta("single_object", [{"class": "circle", "count": 1}], [{"class": "ring", "count": 1}])
    assert correct(mx, [Det("circle", 0.8)])
    assert not correct(mx, [Det("circle", 0.8), Det("ring", 0.4)])
    assert correct(mx, [Det("circle", 0.8), Det("ring", 0.2)])  # filtered out first


def test_at_most_16_objects_per_class():
    many = [Det("circle", 0.95 - i * 0.001) for i in range(20)]
    kept = filter_detections(many, "counting")
    assert len(kept["circle"]) == 16 and kept["circle"][0].score == 0.95
    assert not correct(meta("counting", [{"class": "circle", "count": 17}]), many)
    assert correct(meta("counting", [{"class": "circle", "count": 16}], [{"class": "circle", "count": 17}]),
                   many)


def test_colour_rule_uses_the_top_count_objects():
    m = meta("colors", [{"class": "circle", "count": 1, "color": "red"}])
    assert correct(m, [Det("circle", 0.9, color="red")])
    assert not correct(m, [Det("circle", 0.9, color="blue"), Det("circle", 0.8, color="red")])
    m2 = meta("counting", [{"class": "circle", "count": 2, "color": "red"}])
    assert correct(m2, [Det("circle", 0.99, color="red"), Det("circle", 0.98, color="red"),
                        Det("circle", 0.97, color="blue")])
    assert not correct(m2, [Det("circle", 0.99, color="red"), Det("circle", 0.98, color="blue"),
                            Det("circle", 0.97, color="red")])
    ca = meta("color_attr", [{"class": "circle", "count": 1, "color": "red"},
                             {"class": "square", "count": 1, "color": "blue"}])
    assert correct(ca, [Det("circle", 0.9, color="red"), Det("square", 0.9, color="blue")])
    assert not correct(ca, [Det("circle", 0.9, color="blue"), Det("square", 0.9, color="red")])
    # A colour classifier can stand in for the detections' own colours (the full tier's CLIP step).
    assert correct(ca, [Det("circle", 0.9), Det("square", 0.9)],
                   color_of=lambda objs: ["red" if o.cls == "circle" else "blue" for o in objs])


def test_nms_is_off_by_default_and_uses_inclusive_iou():
    assert box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)  # 10x10 boxes sharing 5x10
    dup = [Det("circle", 0.9, (0, 0, 9, 9)), Det("circle", 0.8, (1, 0, 10, 9)),
           Det("circle", 0.7, (20, 0, 29, 9))]
    assert len(filter_detections(dup, "two_object")["circle"]) == 3
    nms = filter_detections(dup, "two_object", Rules(max_overlap=0.5))["circle"]
    assert [d.score for d in nms] == [0.9, 0.7]


def test_summarize_averages_categories_not_images():
    def res(tag, prompt, ok):
        return {"tag": tag, "metadata": prompt, "correct": ok}
    results = ([res("single_object", "P1", v) for v in (True, False, False, False)]
               + [res("single_object", "P3", False)] * 4
               + [res("counting", "P2", True)] * 2)
    s = summarize(results)
    assert s["single_object"] == 1 / 8 and s["counting"] == 1.0
    assert s["overall"] == pytest.approx((1 / 8 + 1) / 2)     # not the image mean 3/10
    assert s["correct_images"] == pytest.approx(3 / 10)
    assert s["correct_prompts"] == pytest.approx(2 / 3)       # P1 (one good image) and P2
    assert s["n_images"] == 10 and s["n_prompts"] == 3
    assert "position" not in s
    with pytest.raises(BenchError, match="tag 'spatial'"):
        summarize([res("spatial", "P", True)])
    with pytest.raises(BenchError, match="no GenEval results"):
        summarize([])
