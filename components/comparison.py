"""Which factor is best, with training noise counted: what the sweep's verdict and the nightly
regression signal claim.

Every model (one f, one seed) is scored once, on its whole sample, against one reference: KID,
which is unbiased in the number of samples (FID is not, so its ranking would drift with N). A
model's score varies with its training run and with its own samples; the spread of one factor's
scores across seeds measures both together. Factors are compared on those seed-level scores:

- **claims**: Welch's t-test of each pair's difference of means, Holm's step-down over all pairs
  at family-wise level 1 - confidence. Each pair's interval is at the level it was tested at, so
  "A beats B" is exactly "the interval of A - B lies below 0".
- **P(f is best)**: draws of each factor's mean from its t distribution (mean, s/sqrt(S), S - 1
  degrees of freedom: a normal mean's posterior under a flat prior); the share of draws in
  which f is lowest.
- **one seed** for some f: training noise is unmeasured, so nothing is claimed, and P(best)
  reflects evaluation noise only (the evaluations' own bootstrap intervals).

Why not a bootstrap over seeds: resampling 2 or 3 seeds underestimates their spread (the mean of
two draws from two values). Simulated at this project's sizes with training noise dominant, a
hierarchical bootstrap with Holm claimed a difference between identical factors in 55 % of
trials at a nominal 5 %; Welch with Holm stays at or below 5 % (``tests/test_comparison.py``).
The reference is the same for every factor: its own sampling noise moves all scores together and
cancels in the differences, so it is not part of the spread.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from itertools import combinations
from statistics import fmean, stdev

import numpy as np
from scipy import stats

METRIC = "KID"
DRAWS = 20_000  # P(best): its Monte Carlo error is below 0.004


@dataclass(frozen=True)
class Difference:
    """``a`` against ``b``: the difference of their mean scores (a - b; below 0: a is better)."""

    a: Hashable
    b: Hashable
    estimate: float
    low: float  # interval at ``level``, the level Holm tested this pair at
    high: float
    level: float
    p: float  # Welch's two-sided p-value of "no difference"
    claimed: bool  # Holm rejects "no difference"

    @property
    def better(self) -> Hashable:
        return self.a if self.estimate < 0 else self.b

    @property
    def worse(self) -> Hashable:
        return self.b if self.estimate < 0 else self.a


@dataclass(frozen=True)
class Comparison:
    """Factors compared on their seeds' KID (``compare``)."""

    scores: dict[int, list[float]]  # per factor, one score per seed
    estimate: dict[int, float]  # mean over seeds
    interval: dict[int, tuple[float, float]]
    p_best: dict[int, float]  # sums to 1 over the factors
    differences: list[Difference]  # every pair, when training noise is measured
    confidence: float

    @property
    def training_noise_measured(self) -> bool:
        """Every factor has at least two independently trained models."""
        return bool(self.scores) and min(len(s) for s in self.scores.values()) >= 2

    @property
    def claims(self) -> list[Difference]:
        return [d for d in self.differences if d.claimed]

    def ranked(self) -> list[int]:
        return sorted(self.estimate, key=lambda f: self.estimate[f])


def compare(
    scores: dict[int, list[float]],
    *,
    evaluation_intervals: dict[int, list[tuple[float, float]]] | None = None,
    confidence: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """Compare factors on per-seed scores (lower is better). ``evaluation_intervals``: each
    seed's own bootstrap interval at ``confidence``, for P(best) where a factor has one seed."""
    scores = {f: [float(v) for v in values] for f, values in sorted(scores.items()) if values}
    estimate = {f: fmean(values) for f, values in scores.items()}
    measured = bool(scores) and min(len(v) for v in scores.values()) >= 2
    z = stats.norm.ppf(0.5 + confidence / 2)
    if measured:
        spread = {f: (stdev(v) / np.sqrt(len(v)), len(v) - 1) for f, v in scores.items()}
    else:  # evaluation noise only: each seed's interval width, averaged, over sqrt(seeds)
        intervals = evaluation_intervals or {}
        spread = {
            f: (fmean((hi - lo) / (2 * z) for lo, hi in intervals.get(f) or [(0.0, 0.0)]) / np.sqrt(len(v)), None)
            for f, v in scores.items()
        }
    interval = {f: _interval(estimate[f], se, df, confidence) for f, (se, df) in spread.items()}
    tests = [(a, b, *welch(scores[a], scores[b])) for a, b in combinations(scores, 2)] if measured else []
    return Comparison(
        scores=scores,
        estimate=estimate,
        interval=interval,
        p_best=_p_best(estimate, spread, seed),
        differences=holm(tests, 1 - confidence),
        confidence=confidence,
    )


def holm(tests: list[tuple[Hashable, Hashable, float, float, float]], alpha: float) -> list[Difference]:
    """Holm's step-down over ``tests`` (a, b, estimate of a - b, its standard error, degrees of
    freedom): the i-th smallest p-value of m is tested at alpha / (m - i) until one fails."""
    m = len(tests)
    with_p = sorted(((*t, _p_value(*t[2:])) for t in tests), key=lambda t: t[-1])
    out, rejecting = [], True
    for i, (a, b, estimate, se, df, p) in enumerate(with_p):
        level_alpha = alpha / (m - i)
        rejecting = rejecting and p <= level_alpha
        half = _quantile(1 - level_alpha / 2, df) * se
        out.append(Difference(a, b, estimate, estimate - half, estimate + half, 1 - level_alpha, p, rejecting))
    return out


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Difference of means, its standard error and Welch-Satterthwaite degrees of freedom."""
    va, vb = stdev(a) ** 2 / len(a), stdev(b) ** 2 / len(b)
    se = float(np.sqrt(va + vb))
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va + vb > 0 else float("inf")
    return fmean(a) - fmean(b), se, df


def _p_value(estimate: float, se: float, df: float) -> float:
    if se == 0:  # identical seeds: any difference is exact
        return 0.0 if estimate != 0 else 1.0
    return float(2 * stats.t.sf(abs(estimate) / se, df))


def _quantile(q: float, df: float | None) -> float:
    return float(stats.norm.ppf(q) if df is None or np.isinf(df) else stats.t.ppf(q, df))


def _interval(mean: float, se: float, df: float | None, confidence: float) -> tuple[float, float]:
    half = _quantile(0.5 + confidence / 2, df) * se
    return mean - half, mean + half


def _p_best(estimate: dict[int, float], spread: dict[int, tuple[float, float | None]], seed: int) -> dict[int, float]:
    """Share of draws of every factor's mean in which it is the lowest (ties split)."""
    if not estimate:
        return {}
    rng = np.random.default_rng(seed)
    factors = list(estimate)
    draws = np.stack(
        [
            estimate[f]
            + spread[f][0] * (rng.standard_t(spread[f][1], DRAWS) if spread[f][1] else rng.standard_normal(DRAWS))
            for f in factors
        ]
    )
    lowest = draws == draws.min(0)
    share = (lowest / lowest.sum(0)).mean(1)
    return {f: float(s) for f, s in zip(factors, share, strict=True)}
