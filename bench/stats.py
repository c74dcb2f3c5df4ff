"""The statistics leaderboards and the regression gate rest on, in one place.

* **Bootstrap confidence intervals of a mean** (leaderboard cells aggregated over seeds): the percentile
  method (Efron & Tibshirani 1993, ch. 13) with ``BOOTSTRAP_RESAMPLES`` = 2,000 resamples — they
  recommend at least 1,000 for percentile intervals — drawn from a generator seeded with
  ``BOOTSTRAP_SEED`` and the sample size, so a table rebuilt from the same records is identical to the
  byte, and a row's interval depends only on that row's values. Quantiles are numpy's default linear
  interpolation. With the 2–5 seeds a leaderboard usually has, percentile intervals are known to be
  too narrow (they cannot be wider than the sample's range); the tables say so and show ``n``. One value
  has no interval (``None``), never a zero-width one.
* **Mann–Whitney U** (two-sided), the rank test asv's ``compare`` uses to decide that two sets of timings
  differ (measurement.md §5.4). ``scipy.stats.mannwhitneyu`` when scipy is importable (it is part of the
  ``nlp``/``dev`` extras); otherwise `mann_whitney_u` below: the exact null distribution (no ties, small
  samples) by the usual recursion over the two sample sizes, else the normal approximation with tie and
  continuity corrections (Hollander, Wolfe & Chicken, *Nonparametric Statistical Methods*, §4.1).
* **The smallest two-sided p-value a rank test can reach** with sample sizes ``n1``, ``n2``:
  ``2 / C(n1 + n2, n1)`` (every sample of one side below every sample of the other). asv falls back to
  confidence intervals when p < 0.002 is out of reach; so does `bench.gate`.
* **Distribution-free confidence interval of a median** from order statistics (the binomial argument,
  Hollander et al. §3.6): the interval ``[x_(k), x_(n-k+1)]`` with the largest ``k`` whose coverage is
  still at least the requested level. Below 8 samples no such interval exists at 99% and the interval
  is unbounded, which makes "the intervals do not overlap" impossible rather than wrongly easy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

#: Bootstrap resamples per interval (Efron & Tibshirani: >= 1,000 for percentile intervals).
BOOTSTRAP_RESAMPLES = 2000
#: Seed of the resampling generator (combined with the sample size): tables are deterministic.
BOOTSTRAP_SEED = 20240917
#: Exact Mann–Whitney null distribution only up to this n1 * n2; the normal approximation beyond.
EXACT_MWU_MAX_CELLS = 400


# --------------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _resample_weights(n: int, resamples: int):
    """(resamples x n) matrix: row b holds how often each value is drawn in resample b, divided by n,
    so ``values @ W.T`` gives every resample's mean in one matrix product."""
    import numpy as np

    rng = np.random.default_rng([BOOTSTRAP_SEED, n])
    draws = rng.integers(0, n, size=(resamples, n))
    counts = np.zeros((resamples, n))
    np.add.at(counts, (np.repeat(np.arange(resamples), n), draws.ravel()), 1.0)
    counts /= n
    counts.setflags(write=False)
    return counts


def bootstrap_cis(
    groups: Sequence[Sequence[float]], confidence: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES
) -> list[tuple[float, float] | None]:
    """Percentile bootstrap interval of the mean of each group (``None`` for groups of fewer than 2).

    Groups of equal size share one resampling matrix, so thousands of groups cost a few matrix products
    (the 10,000-record leaderboard benchmark depends on this)."""
    import numpy as np

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    out: list[tuple[float, float] | None] = [None] * len(groups)
    by_size: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        if len(g) >= 2:
            by_size.setdefault(len(g), []).append(i)
    q = [(1 - confidence) / 2, 1 - (1 - confidence) / 2]
    for n, idx in by_size.items():
        weights = _resample_weights(n, resamples)
        values = np.asarray([groups[i] for i in idx], dtype=float)
        for start in range(0, len(idx), 512):  # bounded memory: 512 groups x resamples at a time
            chunk = values[start : start + 512]
            means = chunk @ weights.T
            lo, hi = np.quantile(means, q, axis=1)
            # a constant group has a zero-width interval, whatever rounding the product introduced
            const = chunk.max(axis=1) == chunk.min(axis=1)
            lo = np.where(const, chunk[:, 0], lo)
            hi = np.where(const, chunk[:, 0], hi)
            for j, (a, b) in enumerate(zip(lo.tolist(), hi.tolist())):
                out[idx[start + j]] = (a, b)
    return out


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    return bootstrap_cis([values], confidence)[0]


# --------------------------------------------------------------------------------------------------
# Rank test
# --------------------------------------------------------------------------------------------------


def min_two_sided_p(n1: int, n2: int) -> float:
    """The smallest two-sided p-value a rank test can give for these sample sizes (no ties)."""
    if n1 < 1 or n2 < 1:
        return 1.0
    return min(1.0, 2.0 / math.comb(n1 + n2, n1))


def _ranks(values: Sequence[float]) -> tuple[list[float], list[int]]:
    """Mid-ranks (1-based; tied values share their average rank) and the sizes of the tie groups."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    ties = []
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        if j > i:
            ties.append(j - i + 1)
        i = j + 1
    return ranks, ties


def _exact_cdf(n1: int, n2: int) -> list[float]:
    """P(U <= u) for u = 0..n1*n2 under the null (no ties).

    Recursion on the largest observation: it belongs to sample 1 with probability n1/(n1+n2) and then
    adds n2 to U (it exceeds every sample-2 value), or to sample 2 and adds nothing."""
    # table[a][b] holds the pmf of U for sizes (a, b); only the previous row over a is kept
    prev = [[1.0] for _ in range(n2 + 1)]  # a = 0: U = 0 with certainty for every b
    for a in range(1, n1 + 1):
        row = [[1.0]]  # b = 0: U = 0
        for b in range(1, n2 + 1):
            p1, p2 = a / (a + b), b / (a + b)
            from_first, from_second = prev[b], row[b - 1]
            pmf = [0.0] * (a * b + 1)
            for u, p in enumerate(from_first):  # largest is from sample 1: U grows by b
                pmf[u + b] += p1 * p
            for u, p in enumerate(from_second):
                pmf[u] += p2 * p
            row.append(pmf)
        prev = row
    cdf, acc = [], 0.0
    for p in prev[n2]:
        acc += p
        cdf.append(min(acc, 1.0))
    return cdf


def mann_whitney_u(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, str]:
    """Two-sided Mann–Whitney U test of x against y, without scipy: (U of x, p-value, method)."""
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("Mann-Whitney U needs two non-empty samples")
    ranks, ties = _ranks(list(x) + list(y))
    u1 = sum(ranks[:n1]) - n1 * (n1 + 1) / 2
    if not ties and n1 * n2 <= EXACT_MWU_MAX_CELLS:
        cdf = _exact_cdf(n1, n2)
        u = round(u1)
        lower = cdf[u]
        upper = 1.0 - (cdf[u - 1] if u > 0 else 0.0)
        return u1, min(1.0, 2 * min(lower, upper)), "exact"
    n = n1 + n2
    mean = n1 * n2 / 2
    tie_term = sum(t**3 - t for t in ties) / (n * (n - 1))
    var = n1 * n2 / 12 * ((n + 1) - tie_term)
    if var <= 0:  # every value equal: no evidence of a difference
        return u1, 1.0, "normal"
    z = (abs(u1 - mean) - 0.5) / math.sqrt(var)  # continuity correction
    p = math.erfc(max(z, 0.0) / math.sqrt(2))
    return u1, min(1.0, p), "normal"


def rank_test(x: Sequence[float], y: Sequence[float]) -> tuple[float, str]:
    """Two-sided Mann–Whitney p-value and which implementation computed it."""
    try:
        from scipy.stats import mannwhitneyu
    except ImportError:
        _, p, how = mann_whitney_u(x, y)
        return p, f"bench.stats.mann_whitney_u ({how})"
    res = mannwhitneyu(list(x), list(y), alternative="two-sided", method="auto")
    return float(res.pvalue), "scipy.stats.mannwhitneyu (method=auto)"


# --------------------------------------------------------------------------------------------------
# Order-statistic interval of a median
# --------------------------------------------------------------------------------------------------


def median_ci(values: Sequence[float], confidence: float = 0.99) -> tuple[float, float]:
    """Distribution-free interval for the median: ``[x_(k), x_(n-k+1)]`` with the largest k such that
    P(Binomial(n, 1/2) <= k - 1) <= (1 - confidence) / 2. Unbounded when n is too small for any k."""
    xs = sorted(values)
    n = len(xs)
    alpha_half = (1 - confidence) / 2
    k, tail = 0, 0.0
    while k < n // 2:
        nxt = tail + math.comb(n, k) / 2**n  # P(B <= k)
        if nxt > alpha_half:
            break
        tail, k = nxt, k + 1
    if k == 0:
        return -math.inf, math.inf
    return xs[k - 1], xs[n - k]


def median(values: Sequence[float]) -> float:
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("median of an empty sequence")
    mid = n // 2
    return xs[mid] if n % 2 else (xs[mid - 1] + xs[mid]) / 2
