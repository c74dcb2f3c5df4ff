"""The statistics under the gate: bench's own Mann-Whitney U against scipy's, the smallest reachable
p-value, and the order-statistic interval of a median (coverage checked by simulation)."""

from __future__ import annotations

import math
import random

import pytest

from bench.stats import mann_whitney_u, median, median_ci, min_two_sided_p, rank_test


@pytest.mark.parametrize(
    "n1,n2,shift,ties",
    [
        (5, 5, 0.0, False),
        (3, 7, 1.0, False),
        (10, 12, 0.8, False),
        (20, 20, 0.3, False),
        (30, 25, 1.0, False),
        (12, 9, 0.5, True),
        (40, 40, 0.2, True),
    ],
)
def test_own_mann_whitney_matches_scipy(n1, n2, shift, ties):
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = random.Random(n1 * 100 + n2)
    draw = (lambda m: round(rng.gauss(m, 1), 0)) if ties else (lambda m: rng.gauss(m, 1))
    x, y = [draw(0) for _ in range(n1)], [draw(shift) for _ in range(n2)]
    u, p, how = mann_whitney_u(x, y)
    method = "exact" if how == "exact" else "asymptotic"
    ref = scipy_stats.mannwhitneyu(x, y, alternative="two-sided", method=method)
    assert u == pytest.approx(float(ref.statistic))
    assert p == pytest.approx(float(ref.pvalue), rel=1e-9, abs=1e-12)
    assert how == ("exact" if not ties and n1 * n2 <= 400 else "normal")


def test_rank_test_names_its_implementation():
    p, how = rank_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert 0 < p <= 1 and ("scipy" in how or "bench.stats" in how)


def test_min_reachable_p_is_attained_by_complete_separation():
    for n1, n2 in ((5, 5), (6, 6), (3, 9), (10, 10)):
        _, p, how = mann_whitney_u(list(range(n1)), [100 + i for i in range(n2)])
        assert how == "exact" and p == pytest.approx(min_two_sided_p(n1, n2))
    assert min_two_sided_p(5, 5) == pytest.approx(2 / 252)  # > 0.002: asv falls back to intervals
    assert min_two_sided_p(6, 6) > 0.002 > min_two_sided_p(7, 7)


def test_median_interval_order_statistics_and_coverage():
    assert median_ci(list(range(7)), 0.99) == (-math.inf, math.inf)  # 2 * 0.5**7 = 0.016 > 0.01
    assert median_ci(list(range(8)), 0.99) == (0, 7)  # 2 * 0.5**8 = 0.0078 <= 0.01
    lo, hi = median_ci(list(range(100)), 0.99)
    assert (lo, hi) == (36, 63)  # the textbook ranks 37 and 64 (1-based) for n = 100 at 99%
    rng = random.Random(1)
    covered = 0
    for _ in range(400):
        xs = [rng.expovariate(1.0) for _ in range(25)]
        lo, hi = median_ci(xs, 0.95)
        covered += lo <= math.log(2) <= hi  # the true median of Exp(1)
    assert covered / 400 >= 0.93
    assert median([3.0, 1.0, 2.0, 10.0]) == 2.5
