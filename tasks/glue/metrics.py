"""GLUE metrics in plain numpy, as GLUE defines them, and the GLUE aggregation rule.

Source: Wang et al., "GLUE: A Multi-Task Benchmark and Analysis Platform for Natural Language
Understanding", ICLR 2019, Table 1 and Section 4: CoLA is scored with Matthews correlation; SST-2, MNLI,
QNLI and RTE with accuracy; MRPC and QQP with F1 (positive class: paraphrase / duplicate) and accuracy;
STS-B with Pearson and Spearman correlation. The GLUE score is the unweighted average of the task scores,
where a task with two metrics scores their mean (MNLI: matched and mismatched accuracy are averaged).

The reference implementations the GLUE baselines and ``transformers``' ``glue_compute_metrics`` call are
scikit-learn (``matthews_corrcoef``, ``f1_score``) and scipy (``pearsonr``, ``spearmanr``). This module
re-implements the definitions so that scoring needs only numpy; ``tests/unit/test_glue_metrics.py`` checks
it against those libraries. One deliberate difference: a correlation of constant predictions (or labels)
is undefined -- scipy returns nan -- and is scored 0.0 here, the convention scikit-learn uses for
Matthews correlation, so a student that collapsed to one output gets a finite, minimal score instead of a
nan that would poison averages. Non-finite predictions still propagate to nan.

All values are in natural units (0.873, not 87.3).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

GLUE_SCORE_RULE = (
    "unweighted mean over the subtasks run of each subtask's score; a subtask with two metrics scores "
    "their mean (GLUE, Wang et al. 2019); MNLI scores the mean of matched and mismatched accuracy"
)

#: Metric names ``compute`` returns per subtask, primary metric first.
METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "cola": ("mcc",),
    "sst2": ("accuracy",),
    "mrpc": ("f1", "accuracy"),
    "stsb": ("pearson", "spearman"),
    "qqp": ("f1", "accuracy"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
}

#: MNLI is scored on two evaluation sets; their metrics are keyed ``<metric>_<set>`` (see ``compute_sets``).
MNLI_EVAL_SETS = ("matched", "mismatched")


def _pair(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(predictions)
    y = np.asarray(labels)
    if p.ndim != 1 or y.ndim != 1:
        raise ValueError(f"expected 1-d predictions and labels, got shapes {p.shape} and {y.shape}")
    if len(p) != len(y):
        raise ValueError(f"{len(p)} predictions for {len(y)} labels")
    if len(p) == 0:
        raise ValueError("no examples to score")
    return p, y


def accuracy(predictions, labels) -> float:
    """Fraction of exact matches."""
    p, y = _pair(predictions, labels)
    return float(np.mean(p == y))


def f1(predictions, labels, positive: int = 1) -> float:
    """Binary F1 of the ``positive`` class: 2·TP / (2·TP + FP + FN).

    0.0 when there is no positive prediction and no positive label (scikit-learn's ``zero_division``
    default also yields 0.0 there).
    """
    p, y = _pair(predictions, labels)
    pp, yp = p == positive, y == positive
    tp = int(np.sum(pp & yp))
    fp = int(np.sum(pp & ~yp))
    fn = int(np.sum(~pp & yp))
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom


def matthews_corrcoef(predictions, labels) -> float:
    """Matthews correlation coefficient (Matthews 1975), in its multi-class form (Gorodkin 2004):

    ``(c·s − Σ_k p_k t_k) / sqrt((s² − Σ_k p_k²)(s² − Σ_k t_k²))`` with ``s`` samples, ``c`` correct,
    ``t_k`` / ``p_k`` the true / predicted counts of class ``k``. For two classes this is the familiar
    ``(TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))``. 0.0 when undefined (all predictions, or
    all labels, one class), as scikit-learn returns.
    """
    p, y = _pair(predictions, labels)
    classes, inverse = np.unique(np.concatenate([y, p]), return_inverse=True)
    t_counts = np.bincount(inverse[: len(y)], minlength=len(classes)).astype(np.float64)
    p_counts = np.bincount(inverse[len(y) :], minlength=len(classes)).astype(np.float64)
    s = float(len(y))
    c = float(np.sum(p == y))
    cov_py = c * s - float(np.dot(p_counts, t_counts))
    cov_pp = s * s - float(np.dot(p_counts, p_counts))
    cov_yy = s * s - float(np.dot(t_counts, t_counts))
    if cov_pp == 0.0 or cov_yy == 0.0:
        return 0.0
    return float(cov_py / np.sqrt(cov_pp * cov_yy))


def pearson(predictions, labels) -> float:
    """Pearson's r. 0.0 when either side is constant (undefined; scipy returns nan, see module note)."""
    p, y = _pair(predictions, labels)
    p = p.astype(np.float64)
    y = y.astype(np.float64)
    dp = p - p.mean()
    dy = y - y.mean()
    # Constant input: the centred vector is exactly zero. (With nan input the norms are nan, the test is
    # false and nan propagates.)
    norm_p, norm_y = np.sqrt(np.dot(dp, dp)), np.sqrt(np.dot(dy, dy))
    if norm_p == 0.0 or norm_y == 0.0:
        return 0.0
    r = float(np.dot(dp, dy) / (norm_p * norm_y))
    # Rounding can push |r| a hair past 1; scipy clips too.
    return max(-1.0, min(1.0, r)) if np.isfinite(r) else r


def rankdata(values) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span ("average" method)."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    # Start of each run of equal values in sorted order.
    new_run = np.concatenate([[True], sorted_v[1:] != sorted_v[:-1]])
    run_id = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.concatenate([starts[1:], [len(v)]])  # exclusive
    mean_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(v), dtype=np.float64)
    ranks[order] = mean_rank[run_id]
    return ranks


def spearman(predictions, labels) -> float:
    """Spearman's rho: Pearson's r of the average ranks (ties share their mean rank, as scipy does)."""
    p, y = _pair(predictions, labels)
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(y))):
        return float("nan")
    return pearson(rankdata(p), rankdata(y))


def _as_predictions(subtask: str, predictions) -> np.ndarray:
    """Accept class indices, logits of shape (n, num_labels), or STS-B scores of shape (n,) or (n, 1)."""
    p = np.asarray(predictions)
    if subtask == "stsb":
        if p.ndim == 2 and p.shape[1] == 1:
            p = p[:, 0]
        return p.astype(np.float64)
    if p.ndim == 2:
        p = p.argmax(axis=1)
    return p


def compute(subtask: str, predictions, labels) -> dict[str, float]:
    """The GLUE metrics of one evaluation set of ``subtask`` (names in ``METRIC_NAMES``).

    ``predictions`` are class indices or logits (argmax is taken), or real scores for STS-B. For MNLI
    call once per evaluation set; :func:`compute_sets` names the results.
    """
    if subtask not in METRIC_NAMES:
        raise ValueError(f"unknown GLUE subtask {subtask!r}; valid: {', '.join(METRIC_NAMES)}")
    p = _as_predictions(subtask, predictions)
    y = np.asarray(labels)
    fns = {
        "mcc": matthews_corrcoef,
        "accuracy": accuracy,
        "f1": f1,
        "pearson": pearson,
        "spearman": spearman,
    }
    return {name: fns[name](p, y) for name in METRIC_NAMES[subtask]}


def metric_keys(subtask: str) -> tuple[str, ...]:
    """The flat metric keys of a subtask's full result: ``METRIC_NAMES``, or for MNLI
    ``accuracy_matched`` and ``accuracy_mismatched``."""
    if subtask == "mnli":
        return tuple(f"accuracy_{s}" for s in MNLI_EVAL_SETS)
    return METRIC_NAMES[subtask]


def compute_sets(subtask: str, sets: Mapping[str, tuple[object, object]]) -> dict[str, float]:
    """Metrics of several evaluation sets ``{name: (predictions, labels)}`` as one flat dict.

    One set (``dev``) keeps the plain names; several get ``<metric>_<set>`` keys (MNLI:
    ``accuracy_matched``, ``accuracy_mismatched``), the keys :func:`task_score` reads.
    """
    if len(sets) == 1:
        ((preds, labels),) = sets.values()
        return compute(subtask, preds, labels)
    out: dict[str, float] = {}
    for name, (preds, labels) in sets.items():
        for metric, value in compute(subtask, preds, labels).items():
            out[f"{metric}_{name}"] = value
    return out


def task_score(subtask: str, metrics: Mapping[str, float]) -> float:
    """A subtask's GLUE score: the unweighted mean of its metrics when it has two (MRPC, QQP: F1 and
    accuracy; STS-B: Pearson and Spearman; MNLI: matched and mismatched accuracy), else its one metric."""
    keys = metric_keys(subtask)
    missing = [k for k in keys if k not in metrics]
    if missing:
        raise KeyError(f"GLUE {subtask} score needs {', '.join(keys)}; missing {', '.join(missing)}")
    return float(sum(float(metrics[k]) for k in keys) / len(keys))


def glue_score(scores: Mapping[str, float]) -> float:
    """The aggregate over the subtasks run (``GLUE_SCORE_RULE``): the unweighted mean of task scores."""
    if not scores:
        raise ValueError("no subtask scores to aggregate")
    return float(sum(scores.values()) / len(scores))
