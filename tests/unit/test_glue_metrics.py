"""GLUE metrics (bench.tasks.glue.metrics) against the reference implementations GLUE's baselines use:
scikit-learn (matthews_corrcoef, f1_score, accuracy_score) and scipy (pearsonr, spearmanr, rankdata)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

scipy_stats = pytest.importorskip("scipy.stats")
sk_metrics = pytest.importorskip("sklearn.metrics")

from bench.tasks.glue import metrics as M  # noqa: E402 (after importorskip)


def _fixed(seed: int, n: int, k: int = 2):
    rng = np.random.default_rng(seed)
    return rng.integers(0, k, n), rng.integers(0, k, n)


# --- Matthews correlation -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [2, 3])
def test_mcc_matches_sklearn(seed, k):
    p, y = _fixed(seed, 200, k)
    assert M.matthews_corrcoef(p, y) == pytest.approx(sk_metrics.matthews_corrcoef(y, p), abs=1e-12)


@pytest.mark.parametrize(
    "p, y",
    [
        ([1, 1, 1, 1], [0, 1, 0, 1]),  # constant predictions: undefined, 0
        ([0, 1, 0, 1], [1, 1, 1, 1]),  # constant labels
        ([0, 0, 0], [0, 0, 0]),  # everything one class
        ([0, 1, 1, 0], [0, 1, 1, 0]),  # perfect: 1
        ([1, 0, 0, 1], [0, 1, 1, 0]),  # inverted: -1
        ([1, 1, 0, 0, 1], [1, 0, 0, 1, 1]),
    ],
)
def test_mcc_edge_cases_match_sklearn(p, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = sk_metrics.matthews_corrcoef(y, p)
    assert M.matthews_corrcoef(p, y) == pytest.approx(expected, abs=1e-12)


def test_mcc_constant_prediction_is_zero_not_nan():
    assert M.matthews_corrcoef(np.ones(50, int), np.arange(50) % 2) == 0.0


# --- accuracy and F1 -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_accuracy_and_f1_match_sklearn(seed):
    p, y = _fixed(seed, 150)
    assert M.accuracy(p, y) == pytest.approx(sk_metrics.accuracy_score(y, p), abs=1e-12)
    assert M.f1(p, y) == pytest.approx(sk_metrics.f1_score(y, p), abs=1e-12)


@pytest.mark.parametrize(
    "p, y",
    [
        ([0, 0, 0, 0], [0, 1, 1, 0]),  # no positive predictions
        ([1, 1, 1, 1], [0, 0, 0, 0]),  # no positive labels
        ([0, 0, 0], [0, 0, 0]),  # no positives at all: 0 (sklearn's zero_division default)
        ([1, 1, 0], [1, 1, 0]),
    ],
)
def test_f1_edge_cases_match_sklearn(p, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = sk_metrics.f1_score(y, p)
    assert M.f1(p, y) == pytest.approx(expected, abs=1e-12)


def test_f1_positive_class_is_one():
    # MRPC/QQP F1 is for the "equivalent"/"duplicate" class, label 1.
    p, y = [1, 0, 0, 0], [1, 1, 0, 0]
    assert M.f1(p, y) == pytest.approx(2 / 3)
    assert M.f1(p, y) == pytest.approx(sk_metrics.f1_score(y, p, pos_label=1))


# --- correlations ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_pearson_and_spearman_match_scipy(seed):
    rng = np.random.default_rng(seed)
    y = rng.uniform(0, 5, 300)
    p = y + rng.normal(0, 1.5, 300)
    assert M.pearson(p, y) == pytest.approx(scipy_stats.pearsonr(p, y)[0], abs=1e-12)
    assert M.spearman(p, y) == pytest.approx(scipy_stats.spearmanr(p, y)[0], abs=1e-12)


def test_spearman_with_ties_matches_scipy():
    # STS-B gold scores are heavily tied (multiples of 0.2 and 0.25); predictions here tie too.
    rng = np.random.default_rng(7)
    y = np.round(rng.uniform(0, 5, 400) * 4) / 4
    p = np.round(y + rng.normal(0, 1, 400))
    assert len(np.unique(y)) < 30 and len(np.unique(p)) < 15
    assert M.spearman(p, y) == pytest.approx(scipy_stats.spearmanr(p, y)[0], abs=1e-12)
    np.testing.assert_allclose(M.rankdata(p), scipy_stats.rankdata(p, method="average"))
    np.testing.assert_allclose(M.rankdata([3, 1, 3, 3, 2]), [4, 1, 4, 4, 2])


def test_correlation_of_constant_input_is_zero_where_scipy_gives_nan():
    y = np.array([0.0, 1.0, 2.5, 4.0, 5.0])
    const = np.full(5, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(scipy_stats.pearsonr(const, y)[0])
        assert math.isnan(scipy_stats.spearmanr(const, y)[0])
    # Deliberate deviation (module docstring): a collapsed regressor scores 0, not nan.
    assert M.pearson(const, y) == 0.0
    assert M.spearman(const, y) == 0.0
    assert M.pearson(y, const) == 0.0


def test_correlation_of_nan_predictions_is_nan():
    y = np.array([0.0, 1.0, 2.0, 3.0])
    p = np.array([0.0, np.nan, 2.0, 3.0])
    assert math.isnan(M.pearson(p, y))
    assert math.isnan(M.spearman(p, y))


def test_perfect_and_inverse_correlation_are_exactly_bounded():
    y = np.linspace(0, 5, 11)
    assert M.pearson(y * 3 + 1, y) == pytest.approx(1.0)
    assert -1.0 <= M.pearson(-y, y) <= -1.0 + 1e-12
    assert M.spearman(y**3, y) == pytest.approx(1.0)


# --- compute, task_score, the GLUE rule -----------------------------------------------------------


@pytest.mark.parametrize(
    "subtask, names",
    [
        ("cola", {"mcc"}),
        ("sst2", {"accuracy"}),
        ("qnli", {"accuracy"}),
        ("rte", {"accuracy"}),
        ("mnli", {"accuracy"}),
        ("mrpc", {"f1", "accuracy"}),
        ("qqp", {"f1", "accuracy"}),
        ("stsb", {"pearson", "spearman"}),
    ],
)
def test_compute_returns_the_glue_metrics_of_each_subtask(subtask, names):
    if subtask == "stsb":
        y = np.linspace(0, 5, 20)
        p = y[::-1] ** 0.5
    else:
        k = 3 if subtask == "mnli" else 2
        p, y = _fixed(1, 60, k)
    out = M.compute(subtask, p, y)
    assert set(out) == names
    assert all(isinstance(v, float) for v in out.values())


def test_compute_values_equal_the_references():
    p, y = _fixed(3, 120)
    out = M.compute("mrpc", p, y)
    assert out["f1"] == pytest.approx(sk_metrics.f1_score(y, p))
    assert out["accuracy"] == pytest.approx(sk_metrics.accuracy_score(y, p))
    assert M.compute("cola", p, y)["mcc"] == pytest.approx(sk_metrics.matthews_corrcoef(y, p))


def test_compute_accepts_logits_and_column_scores():
    logits = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0], [1.0, 0.5, 0.2]])
    assert M.compute("mnli", logits, [1, 0, 2, 1]) == {"accuracy": 0.75}
    scores = np.array([[0.5], [1.5], [4.0]])
    assert M.compute("stsb", scores, [1.0, 2.0, 5.0])["spearman"] == pytest.approx(1.0)


def test_compute_rejects_bad_input():
    with pytest.raises(ValueError, match="predictions for"):
        M.compute("sst2", [0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="no examples"):
        M.compute("sst2", [], [])
    with pytest.raises(ValueError, match="unknown GLUE subtask"):
        M.compute("wnli", [0], [0])


def test_compute_sets_names_mnli_metrics_per_eval_set():
    out = M.compute_sets("mnli", {"matched": ([0, 1, 2, 2], [0, 1, 2, 0]), "mismatched": ([0, 0], [0, 1])})
    assert out == {"accuracy_matched": 0.75, "accuracy_mismatched": 0.5}
    assert M.compute_sets("rte", {"dev": ([0, 1], [0, 0])}) == {"accuracy": 0.5}


def test_task_score_follows_the_glue_rule():
    assert M.task_score("mrpc", {"f1": 0.9, "accuracy": 0.8}) == pytest.approx(0.85)
    assert M.task_score("qqp", {"f1": 0.7, "accuracy": 0.9}) == pytest.approx(0.8)
    assert M.task_score("stsb", {"pearson": 0.88, "spearman": 0.86}) == pytest.approx(0.87)
    assert M.task_score("mnli", {"accuracy_matched": 0.84, "accuracy_mismatched": 0.82}) == pytest.approx(
        0.83
    )
    assert M.task_score("cola", {"mcc": 0.55}) == pytest.approx(0.55)
    assert M.task_score("sst2", {"accuracy": 0.93, "other": 7.0}) == pytest.approx(0.93)
    with pytest.raises(KeyError, match="accuracy_mismatched"):
        M.task_score("mnli", {"accuracy_matched": 0.8})
    assert M.glue_score({"cola": 0.5, "mrpc": 0.85, "mnli": 0.83}) == pytest.approx((0.5 + 0.85 + 0.83) / 3)


def test_glue_score_rule_states_the_rule():
    rule = M.GLUE_SCORE_RULE
    assert "unweighted mean" in rule and "two metrics" in rule and "Wang et al. 2019" in rule
    assert "matched and mismatched" in rule
