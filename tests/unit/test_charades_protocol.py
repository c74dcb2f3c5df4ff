"""Charades-STA zero-shot grounding: the official SMA + watershed procedure and metrics against hand-worked
values, the annotation parser's errors, and the real annotation files (needs_data)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from bench import BenchError
from bench.tasks.charades_sta.annotations import (
    check_videos, clamp_counts, moment_stats, read_durations, read_queries,
)
from bench.tasks.charades_sta.protocol import (
    METRIC_KEYS, cosine_similarity, frame_midpoints, grounding_metrics, nearest_frames, sample_times,
    segments, smooth, temporal_iou, watershed,
)

NEG = float("-inf")


# --------------------------------------------------------------------------------------------------
# frame sampling
# --------------------------------------------------------------------------------------------------

def test_sample_times_are_k_over_fps_strictly_before_the_end():
    # 2.33 s at 3 fps: k/3 < 2.33 for k = 0..6 (6/3 = 2.0; 7/3 = 2.33.. is past the end) -> 7 frames.
    np.testing.assert_allclose(sample_times(2.33), [0, 1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2])
    # 30.0 s: k = 90 gives exactly 30.0, which is not < 30.0 -> 90 frames, the last at 89/3.
    t = sample_times(30.0)
    assert len(t) == 90 and t[-1] == pytest.approx(89 / 3)
    assert len(sample_times(0.1)) == 1 and len(sample_times(0.0)) == 0
    assert len(sample_times(10.0, fps=1.0)) == 10


def test_nearest_frames_ties_go_to_the_later_frame():
    mid = frame_midpoints(8, 4.0)  # 0.125, 0.375, 0.625, ...
    # 0.25 is 0.125 from frames 0 and 1 -> 1; 0.2 is nearer 0.125 -> 0; 0.3 nearer 0.375 -> 1;
    # past the end -> 7.
    np.testing.assert_array_equal(nearest_frames([0.0, 0.2, 0.25, 0.3, 100.0], mid), [0, 0, 1, 1, 7])


def test_cosine_similarity():
    sim = cosine_similarity(np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]), np.array([3.0, 0.0]))
    np.testing.assert_allclose(sim, [1.0, 0.0, 1 / math.sqrt(2)])


# --------------------------------------------------------------------------------------------------
# moving average
# --------------------------------------------------------------------------------------------------

def test_smooth_truncates_the_window_at_the_ends():
    # window 3: interior (0+3+6)/3 = 3, (3+6+3)/3 = 4, (6+3+0)/3 = 3; ends mean(0,3) = 1.5 and mean(3,0) = 1.5
    # (zero padding would give 1.0 there).
    np.testing.assert_allclose(smooth(np.array([0.0, 3, 6, 3, 0]), 3), [1.5, 3, 4, 3, 1.5])
    # window 5 on 1..6: mean(1,2,3) = 2, mean(1..4) = 2.5, mean(1..5) = 3, mean(2..6) = 4, mean(3..6) = 4.5,
    # mean(4,5,6) = 5.
    np.testing.assert_allclose(smooth(np.arange(1.0, 7.0), 5), [2, 2.5, 3, 4, 4.5, 5])


def test_smooth_default_window_15():
    # 16 values, 16 at index 0: index 0 averages x[0:8] -> 2; index 7 averages x[0:15] -> 16/15;
    # index 8 averages x[1:16] -> 0; the right end (index 15) averages x[8:16] -> 0.
    x = np.zeros(16)
    x[0] = 16.0
    y = smooth(x)
    assert y[0] == pytest.approx(2.0) and y[7] == pytest.approx(16 / 15)
    assert y[8] == pytest.approx(0.0) and y[15] == pytest.approx(0.0)
    assert y[1] == pytest.approx(16 / 9)  # x[0:9]


def test_smooth_leaves_curves_no_longer_than_the_window():
    np.testing.assert_array_equal(smooth(np.array([1.0, 2, 3]), 3), [1, 2, 3])  # not [1.5, 2, 2.5]
    x = np.linspace(0, 1, 15)
    np.testing.assert_array_equal(smooth(x), x)


def test_smooth_rejects_even_windows():
    with pytest.raises(ValueError):
        smooth(np.zeros(10), 4)


# --------------------------------------------------------------------------------------------------
# watershed and the padded candidates
# --------------------------------------------------------------------------------------------------

def test_segments_of_a_hand_made_curve_with_padding():
    # window 1 = no smoothing. Sum 2.8, mean 0.35. Frames >= 0.35: 1,2 | 5 | 7.
    # Runs: [1,3) max 0.6; [5,6) max 0.9; [7, ...) reaches the last frame, so its end is 7 itself.
    sim = np.array([0.1, 0.5, 0.6, 0.1, 0.1, 0.9, 0.1, 0.4])
    assert watershed(sim) == [(5, 6, pytest.approx(0.9)), (1, 3, pytest.approx(0.6)),
                              (7, 7, pytest.approx(0.4))]
    # fps 2 -> seconds index/2; three proposals -> two copies of the whole video (0, 4).
    got = segments(sim, fps=2.0, duration=4.0, window=1)
    assert got == [(2.5, 3.0, pytest.approx(0.9)), (0.5, 1.5, pytest.approx(0.6)),
                   (3.5, 3.5, pytest.approx(0.4)),
                   (0.0, 4.0, NEG), (0.0, 4.0, NEG)]


def test_segments_one_run():
    # mean 2/6 = 1/3: one run [2,4) of score 1 -> four copies of (0, duration).
    got = segments(np.array([0.0, 0, 1, 1, 0, 0]), fps=1.0, duration=6.0, window=1)
    assert got == [(2.0, 4.0, 1.0)] + [(0.0, 6.0, NEG)] * 4
    # a run reaching the end: mean 0.4, run from 3 to the last index 4 (not 5) -> (1.5, 2.0) at 2 fps.
    assert segments(np.array([0.0, 0, 0, 1, 1]), fps=2.0, duration=2.5, window=1)[0] == (1.5, 2.0, 1.0)
    # a frame exactly at the threshold is in (>=): mean of [0, 1, 2] is 1 -> run from 1 to the last index 2.
    assert segments(np.array([0.0, 1, 2]), fps=1.0, duration=3.0, window=1)[0] == (1.0, 2.0, 2.0)


def test_threshold_is_the_mean_of_the_smoothed_curve():
    # window 3 on [12,0,0,0,1.5,1.5,1.5,0,0,0]: smoothed [6,4,0,0.5,1,1.5,1,0.5,0,0] (ends: mean(12,0) = 6,
    # mean(0,0) = 0). Smoothed mean 14.5/10 = 1.45 <= 1.5, so [5,6) is a proposal; the raw mean 16.5/10 = 1.65
    # would have dropped it.
    sim = np.array([12.0, 0, 0, 0, 1.5, 1.5, 1.5, 0, 0, 0])
    np.testing.assert_allclose(smooth(sim, 3), [6, 4, 0, 0.5, 1, 1.5, 1, 0.5, 0, 0])
    got = segments(sim, fps=1.0, duration=10.0, window=3)
    assert got == [(0.0, 2.0, 6.0), (5.0, 6.0, 1.5)] + [(0.0, 10.0, NEG)] * 3


def test_segments_keep_the_best_five_ties_in_temporal_order():
    # 1,0,1,0,... (14 frames): mean 0.5, seven one-frame runs all scored 1; the first five in time are kept.
    sim = np.tile([1.0, 0.0], 7)
    got = segments(sim, fps=1.0, duration=14.0, window=1)
    assert [g[:2] for g in got] == [(0.0, 1.0), (2.0, 3.0), (4.0, 5.0), (6.0, 7.0), (8.0, 9.0)]


def test_no_frames_gives_five_whole_video_candidates():
    assert segments(np.array([]), fps=3.0, duration=5.0) == [(0.0, 5.0, NEG)] * 5


def test_default_protocol_times_lie_on_the_frame_grid():
    rng = np.random.default_rng(0)
    t = sample_times(31.7)
    got = segments(0.2 + 0.05 * np.sin(np.arange(len(t)) / 4) + rng.normal(0, 0.01, len(t)), 3.0, 31.7)
    assert len(got) == 5
    for s, e, _ in got:
        if e != 31.7:
            assert 0 <= s <= e <= t[-1] and (3 * s) == pytest.approx(round(3 * s))


# --------------------------------------------------------------------------------------------------
# IoU and metrics
# --------------------------------------------------------------------------------------------------

def test_temporal_iou():
    assert temporal_iou((0, 4), (1, 3)) == 0.5  # inter 2, union 4
    assert temporal_iou((0, 10), (5, 15)) == pytest.approx(1 / 3)  # inter 5, union 15
    assert temporal_iou((0, 1), (2, 3)) == 0.0  # disjoint
    assert temporal_iou((0, 1), (1, 2)) == 0.0  # touching
    assert temporal_iou((2, 6), (2, 7)) == pytest.approx(0.8)
    assert temporal_iou((2, 2), (2, 2)) == 0.0  # empty hull


def test_grounding_metrics_hand_worked():
    preds = [
        [(0, 10)],  # gt (0,5), dur 10: IoU 0.5 everywhere (padding is (0,10) too) -> 0.3 only (strict >)
        [(7, 9), (2, 7)],  # gt (2,6): top-1 IoU 0; (2,7) IoU 4/5 = 0.8; padding (0,10) IoU 0.4
        [(6, 8)],  # gt (6,14) clamped to (6,8) by duration 8 -> IoU 1 (unclamped it would be 0.25)
        [(0, 10)],  # gt (0,7): IoU exactly 0.7 -> 0.3 and 0.5, not 0.7
    ]
    gts = [(0, 5), (2, 6), (6, 14), (0, 7)]
    durs = [10.0, 10.0, 8.0, 10.0]
    m = grounding_metrics(preds, gts, durs)
    assert set(m) == set(METRIC_KEYS)
    # R@1: 0.3 by q1,q3,q4 -> 3/4; 0.5 by q3,q4 -> 2/4; 0.7 by q3 -> 1/4.
    assert (m["r1_iou0.3"], m["r1_iou0.5"], m["r1_iou0.7"]) == (0.75, 0.5, 0.25)
    # R@5: 0.3 by all four; 0.5 by q2,q3,q4 -> 3/4; 0.7 by q2,q3 -> 2/4.
    assert (m["r5_iou0.3"], m["r5_iou0.5"], m["r5_iou0.7"]) == (1.0, 0.75, 0.5)
    # mIoU of the top-1 candidates: (0.5 + 0 + 1 + 0.7) / 4 = 0.55.
    assert m["miou"] == pytest.approx(0.55)


def test_iou_on_the_threshold_does_not_count():
    # IoU 3/10 = 0.3 and 5/10 = 0.5 exactly: neither passes its own threshold.
    assert grounding_metrics([[(0, 10)]], [(0, 3)], [10.0])["r1_iou0.3"] == 0.0
    assert grounding_metrics([[(0, 10)]], [(0, 5)], [10.0])["r1_iou0.5"] == 0.0
    assert grounding_metrics([[(0, 10)]], [(0, 5.5)], [10.0])["r1_iou0.5"] == 1.0


def test_only_the_first_five_candidates_count():
    # gt (2,3) in a 10 s video: five misses (IoU 0) then a perfect sixth -> R@5 = 0.
    preds = [[(5, 6)] * 5 + [(2, 3)]]
    assert grounding_metrics(preds, [(2, 3)], [10.0])["r5_iou0.3"] == 0.0
    # four candidates (IoU 1/8 with gt (0,8)): the fifth is the padding (0,10), IoU 8/10 = 0.8 > 0.7 -> a hit.
    assert grounding_metrics([[(5, 6)] * 4], [(0, 8)], [10.0])["r5_iou0.7"] == 1.0


def test_metrics_from_segments():
    sim = np.array([0.0, 0, 1, 1, 0, 0])  # one run (2, 4) at 1 fps, then (0, 6) padding
    cands = segments(sim, fps=1.0, duration=6.0, window=1)
    m = grounding_metrics([cands], [(2.0, 5.0)], [6.0])
    # top-1 IoU 2/3 -> R@1 at 0.3 and 0.5, not 0.7; padding (0,6) IoU 3/6 = 0.5 adds nothing.
    assert (m["r1_iou0.3"], m["r1_iou0.5"], m["r1_iou0.7"], m["r5_iou0.7"]) == (1.0, 1.0, 0.0, 0.0)
    assert m["miou"] == pytest.approx(2 / 3)


# --------------------------------------------------------------------------------------------------
# annotation files
# --------------------------------------------------------------------------------------------------

def _write(tmp_path: Path, text: str, name: str = "ann.txt") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("bad, what", [
    ("AAAAA 1.x 3.0##a person sits.", "'1.x'"),
    ("AAAAA -1.0 3.0##a person sits.", "'-1.0'"),
    ("AAAAA 1.0 3.0 a person sits.", "missing '##'"),
    ("AAAAA 1.0##a person sits.", "VIDEO_ID START END"),
    ("AAAAA 1.0 3.0##   ", "empty sentence"),
    ("AAAAA 4.0 3.0##a person sits.", "after end"),
])
def test_bad_annotation_lines_name_the_line(tmp_path, bad, what):
    p = _write(tmp_path, f"AAAAA 0.0 2.5##a person stands.\n\n{bad}\n")
    with pytest.raises(BenchError) as e:
        read_queries(p)
    assert f"{p}, line 3" in str(e.value) and what in str(e.value)


def test_queries_parse_and_inverted_can_be_kept(tmp_path):
    p = _write(tmp_path, "AAAAA 0.0 2.5##a person stands.\nBBBBB 4.0 3.0##a person sits.\n")
    qs = read_queries(p, allow_inverted=True)
    assert [(q.video, q.start, q.end, q.sentence, q.line) for q in qs] == [
        ("AAAAA", 0.0, 2.5, "a person stands.", 1), ("BBBBB", 4.0, 3.0, "a person sits.", 2)]


def test_missing_video_names_the_query_line(tmp_path):
    ann = _write(tmp_path, "AAAAA 0.0 2.5##a person stands.\nZZZZZ 1.0 2.0##a person sits.\n")
    dur = read_durations(_write(tmp_path, "id,length,split\nAAAAA,10.5,test\n", "d.csv"))
    assert dur == {"AAAAA": 10.5}
    with pytest.raises(BenchError) as e:
        check_videos(read_queries(ann), dur, ann)
    assert f"{ann}, line 2" in str(e.value) and "'ZZZZZ'" in str(e.value)


@pytest.mark.parametrize("csv_text, what", [
    ("id,length\nAAAAA,abc\n", "line 2"),
    ("id,length\nAAAAA,10\nAAAAA,11\n", "listed twice"),
    ("id,len\nAAAAA,10\n", "'id' and 'length'"),
    ("id,length\nAAAAA,0\n", "'0'"),
])
def test_bad_durations(tmp_path, csv_text, what):
    with pytest.raises(BenchError) as e:
        read_durations(_write(tmp_path, csv_text, "d.csv"))
    assert what in str(e.value)


def test_clamping_counts_and_stats(tmp_path):
    qs = read_queries(_write(tmp_path, "AAAAA 2.0 12.0##x.\nAAAAA 1.0 3.0##y.\n"))
    dur = {"AAAAA": 10.0}
    assert clamp_counts(qs, dur) == {"end_clamped": 1, "start_clamped": 0, "inverted": 0}
    st = moment_stats(qs, dur)
    # (2, 12) -> (2, 10): rel start 0.2, rel length 0.8; (1, 3): 0.1 and 0.2.
    np.testing.assert_allclose(st.durations, [10, 10])
    np.testing.assert_allclose(st.rel_start, [0.2, 0.1])
    np.testing.assert_allclose(st.rel_length, [0.8, 0.2])


# --------------------------------------------------------------------------------------------------
# the real files
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def charades_dir() -> Path:
    base = os.environ.get("BENCH_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data"
    root = Path(base) / "charades_sta"
    names = ("charades_sta_train.txt", "charades_sta_test.txt", "video_durations.csv")
    if not all((root / n).is_file() for n in names):
        pytest.skip(f"Charades-STA annotation files not found under {root} (set BENCH_DATA to the data root)")
    return root


@pytest.mark.needs_data
def test_real_files_parse(charades_dir):
    dur = read_durations(charades_dir / "video_durations.csv")
    test = read_queries(charades_dir / "charades_sta_test.txt")
    check_videos(test, dur, charades_dir / "charades_sta_test.txt")
    assert len(test) == 3720 and len({q.video for q in test}) == 1334
    assert clamp_counts(test, dur) == {"end_clamped": 562, "start_clamped": 0, "inverted": 0}
    # the official train file has 4 inverted moments, the first on line 8252
    with pytest.raises(BenchError, match="line 8252"):
        read_queries(charades_dir / "charades_sta_train.txt")
    train = read_queries(charades_dir / "charades_sta_train.txt", allow_inverted=True)
    check_videos(train, dur, charades_dir / "charades_sta_train.txt")
    assert len(train) == 12408 and clamp_counts(train, dur)["inverted"] == 4
    st = moment_stats(test, dur)
    assert len(st.durations) == 3720
    assert (st.rel_start >= 0).all() and (st.rel_length > 0).all()
    assert (st.rel_start + st.rel_length <= 1 + 1e-12).all()
