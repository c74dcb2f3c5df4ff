"""Charades-STA zero-shot temporal grounding: frame sampling, SMA + watershed proposals, and the metrics.

Reproduces the evaluation of ResidualViT (Soldan et al., ICCV 2025) as released in

* ``adobe-research/zs-video-eval`` @ b9bf878 -- ``aligner/text_video_grounding.py``
  (``TextVideoGroundingLightningModule._compute_metrics``), ``aligner/utils/post_processing.py``
  (``SimpleMovingAverage.smooth``, ``SimpleWatershed.__call__``), ``aligner/utils/video_utils.py`` (``_iou``),
  ``aligner/data/grounding/_base_dataset_class.py`` (``ClipIterator._compute_frame_indexes``),
  ``aligner/data/video_reader.py`` (``DecordVideoReader.time_to_indices``),
  ``aligner/data/grounding/charades_sta.py`` (``CharadesSTA._compute_annotaions``), ``config/trainer.yaml``
  and ``scripts/ResidualViT_charades_sta.sh``;
* ``Soldelli/residualvit`` @ f07a70c -- ``scripts/evaluation/ResidualViT_charades_sta.sh`` (same flags:
  ``data.frame_rate=3.0``, ``post_processing.smoothing_function=SMA``, ``smoothing_window_size=15``,
  ``watershed_threshold=1.0``; scoring stays at the ``config/trainer.yaml`` default ``max``).

The procedure, per query (written from reading that code, not copied from it):

1. Frames are sampled at ``k / fps`` seconds for every integer ``k >= 0`` with ``k / fps < duration``
   (:func:`sample_times`); each timestamp is decoded as the video frame whose display-interval midpoint is
   nearest, ties going to the later frame (:func:`nearest_frames`).
2. ``sim[k]`` = cosine similarity of frame ``k``'s embedding with the query's text embedding.
3. Simple moving average (:func:`smooth`): a curve no longer than the window is returned unchanged; otherwise
   each value is the mean of the centred window of ``window`` frames, truncated at the two ends (the edge
   values average only the frames that exist, so no zero padding leaks in).
4. Watershed (:func:`watershed`) on the *smoothed* curve: ``gamma = threshold * mean(smoothed)``; every
   maximal run of frames with value ``>= gamma`` is one proposal
   ``(first index, index of the first frame below)``, except that a run reaching the last frame ends at
   the last frame's own index ``n - 1`` (not ``n``).
   Its score is the max of the smoothed values in the run. Proposals are sorted by score, best first.
5. Seconds are ``index / fps`` for both ends, never clipped (they cannot exceed the duration). With fewer than
   5 proposals the list is filled up to 5 with copies of the whole video ``[0, duration]`` (two proposals ->
   three copies); with more, only the first 5 are evaluated.
6. The ground truth is clamped to ``[0, duration]``. ``IoU = max(0, min(e) - max(s)) / (max(e) - min(s))``
   (the union is the hull, equal to the true union whenever the two overlap). A query counts for R@k at
   threshold t when any of its first k candidates has ``IoU > t`` (strict). R@{1,5} x IoU{0.3,0.5,0.7}.
   IoUs, thresholds and moments are float32 there, and so they are in :func:`temporal_iou`,
   :func:`clamp_moment` and :func:`grounding_metrics` (which cast their float64 inputs).

Deviations (all deliberate):

* ``miou`` (mean over queries of the top-1 candidate's IoU with the clamped ground truth) is added; the
  official code computes none. Metrics are fractions in [0, 1], not the official percentages rounded to 2
  decimals. Key names: ``r1_iou0.3 ... r5_iou0.7, miou`` (official ``R@1-IoU=0.3`` ...).
* The official code takes a video's duration from decoding it (``num_frames / avg_fps`` by decord); callers
  here pass the ``length`` column of Charades_v1 (``video_durations.csv``), which may differ slightly.
* Smoothing and the threshold use float64 here, float32 in torch there: only a value within float rounding of
  ``gamma`` can fall on the other side. The frame timestamps are exact ``k / fps`` (the official float32
  ``torch.linspace`` may move a frame lying exactly on ``duration`` in or out).
* The official sort is ``torch.argsort(descending=True)``, whose order among equal scores is unspecified (on
  CPU torch 2.x it matches a stable sort for up to 16 proposals, not beyond). Here ties keep temporal order.
* An even smoothing window (the official zero-padded convolution then yields ``n + 1`` values) is refused.
* A candidate and ground truth whose hull is empty (both zero-length at the same instant) have IoU 0 here,
  NaN there; NaN fails every ``>`` so recall is unaffected; mIoU counts it as 0.
* Padding candidates carry score ``-inf`` in :func:`segments` (the official code keeps no score for them).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

FPS = 3.0
WINDOW = 15
GAMMA = 1.0
TOP_K = 5
RECALLS = (1, 5)
IOU_THRESHOLDS = (0.3, 0.5, 0.7)
METRIC_KEYS = tuple(f"r{r}_iou{t}" for r in RECALLS for t in IOU_THRESHOLDS) + ("miou",)

_F32 = np.float32


def sample_times(duration: float, fps: float = FPS) -> np.ndarray:
    """Timestamps (seconds) of the frames the protocol samples: ``k / fps`` for ``k = 0, 1, ...`` while
    ``k / fps < duration`` (strictly), i.e. ``ceil(duration * fps)`` frames."""
    if not (math.isfinite(duration) and duration >= 0):
        raise ValueError(f"duration must be a finite number of seconds >= 0, got {duration!r}")
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a finite number > 0, got {fps!r}")
    n = max(0, math.ceil(duration * fps))
    while n > 0 and (n - 1) / fps >= duration:  # guard the float product at exact multiples
        n -= 1
    while n / fps < duration:
        n += 1
    return np.arange(n, dtype=np.float64) / fps


def frame_midpoints(num_frames: int, native_fps: float) -> np.ndarray:
    """Display-interval midpoints of a constant-rate video's frames, as decord reports them
    (mean of each frame's [start, end] timestamps)."""
    return (np.arange(num_frames, dtype=np.float64) + 0.5) / native_fps


def nearest_frames(times: Sequence[float] | np.ndarray,
                   frame_times: Sequence[float] | np.ndarray) -> np.ndarray:
    """Index of the decoded frame used for each sample time: the frame whose timestamp is nearest, a tie going
    to the later frame, clipped to the video (as ``DecordVideoReader.time_to_indices``)."""
    ft = np.asarray(frame_times, dtype=np.float64)
    t = np.asarray(times, dtype=np.float64)
    if ft.ndim != 1 or len(ft) == 0:
        raise ValueError("frame_times must be a non-empty 1-D sequence")
    idx = np.clip(np.searchsorted(ft, t, side="left"), 0, len(ft) - 1)
    later_is_nearer = (idx == 0) | (ft[idx] - t <= t - ft[np.maximum(idx - 1, 0)])
    return np.where(later_is_nearer, idx, idx - 1)


def cosine_similarity(frames: np.ndarray, text: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Cosine similarity of each row of ``frames`` (T, D) with ``text`` (D,), each norm clamped at ``eps``
    (as ``torch.nn.functional.cosine_similarity``)."""
    f = np.asarray(frames, dtype=np.float64)
    q = np.asarray(text, dtype=np.float64).reshape(-1)
    if f.ndim != 2 or f.shape[1] != q.shape[0]:
        raise ValueError(f"frames must be (T, {q.shape[0]}), got {f.shape}")
    fn = np.maximum(np.linalg.norm(f, axis=1), eps)
    qn = max(float(np.linalg.norm(q)), eps)
    return (f @ q) / (fn * qn)


def smooth(sim: np.ndarray, window: int = WINDOW) -> np.ndarray:
    """Centred simple moving average of width ``window`` (odd), truncated at both ends; a curve of at most
    ``window`` values comes back unchanged."""
    x = np.asarray(sim, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"sim must be 1-D, got shape {x.shape}")
    if not isinstance(window, (int, np.integer)) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd integer >= 1, got {window!r}")
    n = len(x)
    if n <= window:
        return x.copy()
    half = window // 2
    out = np.convolve(x, np.ones(window), mode="same") / window  # interior: full centred windows
    for i in range(half):  # ends: mean over the part of the window inside the curve
        out[i] = x[: i + half + 1].mean()
        out[n - 1 - i] = x[n - 1 - i - half:].mean()
    return out


def watershed(curve: np.ndarray, gamma: float = GAMMA) -> list[tuple[int, int, float]]:
    """Runs of ``curve >= gamma * mean(curve)`` as ``(start_index, end_index, max value)``, best first.

    ``end_index`` is the first index below the threshold, or ``len(curve) - 1`` for a run that reaches the
    end.
    Equal scores keep temporal order."""
    c = np.asarray(curve, dtype=np.float64)
    if c.ndim != 1:
        raise ValueError(f"curve must be 1-D, got shape {c.shape}")
    runs: list[tuple[int, int, float]] = []
    if len(c) == 0:
        return runs
    above = c >= c.mean() * gamma
    start = None
    for k in range(len(c)):
        if above[k] and start is None:
            start = k
        elif not above[k] and start is not None:
            runs.append((start, k, float(c[start:k].max())))
            start = None
    if start is not None:
        runs.append((start, len(c) - 1, float(c[start:].max())))
    return sorted(runs, key=lambda r: -r[2])  # sorted() is stable


def segments(sim: np.ndarray, fps: float, duration: float, window: int = WINDOW, gamma: float = GAMMA,
             top_k: int = TOP_K) -> list[tuple[float, float, float]]:
    """The protocol's ``top_k`` candidates ``(start_s, end_s, score)`` for one query, best first: smoothed
    watershed proposals, then copies of the whole video ``(0, duration, -inf)`` up to ``top_k``."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a finite number > 0, got {fps!r}")
    runs = watershed(smooth(sim, window), gamma)
    out = [(s / fps, e / fps, score) for s, e, score in runs[:top_k]]
    whole = (0.0, float(duration), float("-inf"))
    return out + [whole] * (top_k - len(out))


def temporal_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Temporal IoU of two ``(start, end)`` intervals in float32; 0.0 when their hull is empty."""
    s1, e1, s2, e2 = (_F32(v) for v in (a[0], a[1], b[0], b[1]))
    inter = max(min(e1, e2) - max(s1, s2), _F32(0))
    union = max(e1, e2) - min(s1, s2)
    if not union > 0:
        return 0.0
    return float(_F32(inter / union))


def clamp_moment(gt: tuple[float, float], duration: float) -> tuple[float, float]:
    """The ground truth clamped to ``[0, duration]`` in float32, as
    ``torch.tensor(time).clamp(0, duration)``."""
    d = _F32(duration)
    return tuple(float(min(max(_F32(v), _F32(0)), d)) for v in gt)  # type: ignore[return-value]


def grounding_metrics(preds: Sequence[Sequence[tuple[float, float]]], gts: Sequence[tuple[float, float]],
                      durations: Sequence[float]) -> dict[str, float]:
    """R@{1,5} at IoU > {0.3,0.5,0.7} and top-1 mIoU, as fractions over the queries.

    ``preds[i]`` is query i's ranked candidates ``(start_s, end_s[, score])``; a list shorter than 5 is filled
    with ``(0, durations[i])`` as the official code does, and only its first 5 are used. ``gts[i]`` is clamped
    to ``[0, durations[i]]``."""
    if not (len(preds) == len(gts) == len(durations)):
        raise ValueError(f"preds, gts and durations differ in length: "
                         f"{len(preds)}, {len(gts)}, {len(durations)}")
    if len(preds) == 0:
        raise ValueError("no queries to evaluate")
    k_max = max(RECALLS)
    thresholds = np.array(IOU_THRESHOLDS, dtype=np.float32)
    hits = {r: np.zeros(len(thresholds)) for r in RECALLS}
    top1 = np.zeros(len(preds))
    for i, (cands, gt, dur) in enumerate(zip(preds, gts, durations)):
        cands = [tuple(c[:2]) for c in list(cands)[:k_max]]
        cands += [(0.0, dur)] * (k_max - len(cands))
        g = clamp_moment(gt, dur)
        ious = np.array([temporal_iou(c, g) for c in cands], dtype=np.float32)
        above = ious[:, None] > thresholds[None, :]
        for r in RECALLS:
            hits[r] += above[:r].any(axis=0)
        top1[i] = ious[0]
    out = {f"r{r}_iou{t}": float(hits[r][j] / len(preds))
           for r in RECALLS for j, t in enumerate(IOU_THRESHOLDS)}
    out["miou"] = float(top1.mean())
    return out
