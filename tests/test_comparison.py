"""The verdict's statistics hold their error rate: identical factors trained with noise are not
told apart more often than the family-wise level allows, real differences are found, and one
seed claims nothing."""

from __future__ import annotations

import numpy as np
import pytest

from components.comparison import compare
from components.metrics import kid_of_features

D, REFERENCE, SAMPLES = 128, 494, 256  # the domain extractor's features; val and eval.samples of the main job
FACTORS = (1, 2, 4, 8, 16, 32)


def _kid_of_a_model(rng: np.random.Generator, reference: np.ndarray, shift: float, training_noise: float) -> float:
    """One trained model's KID: its samples' distribution is off by ``shift`` plus its own
    training run's error (a random offset of scale ``training_noise``)."""
    offset = shift + rng.normal(0, training_noise, D)
    return kid_of_features(reference, rng.normal(size=(SAMPLES, D)) + offset)


def test_identical_factors_are_told_apart_no_more_often_than_the_family_wise_level():
    """Training noise dominant (as measured: one f's two seeds scored KID 0.026 and 0.087): with
    two seeds per factor, 40 simulated sweeps of six identical factors claim some "A beats B" in
    at most 5 (the nominal 5 % is 2 of 40; P(>= 6) = 1.4 % under it)."""
    trials_with_a_claim = 0
    for trial in range(40):
        rng = np.random.default_rng(trial)
        reference = rng.normal(size=(REFERENCE, D))
        scores = {f: [_kid_of_a_model(rng, reference, 0.1, 0.3) for _ in range(2)] for f in FACTORS}
        trials_with_a_claim += bool(compare(scores).claims)
    assert trials_with_a_claim <= 5


def test_real_differences_are_claimed_and_p_best_goes_to_the_best_factor():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(REFERENCE, D))
    shifts = {1: 0.5, 2: 0.3, 4: 0.12, 8: 0.05, 16: 0.2, 32: 0.6}
    scores = {f: [_kid_of_a_model(rng, reference, s, 0.01) for _ in range(3)] for f, s in shifts.items()}
    result = compare(scores)
    assert result.training_noise_measured and result.ranked()[0] == 8
    assert sum(result.p_best.values()) == pytest.approx(1.0)
    assert max(result.p_best, key=result.p_best.get) == 8
    claimed = {(d.better, d.worse) for d in result.claims}
    assert {(8, 1), (8, 32), (4, 32)} <= claimed
    for d in result.differences:  # a claim is exactly an interval of the difference that excludes 0
        assert d.claimed == (d.high < 0 or d.low > 0)
        assert (d.better, d.worse) in claimed or not d.claimed


def test_one_seed_leaves_training_noise_unmeasured_and_claims_nothing():
    scores = {4: [0.05], 8: [0.02], 32: [0.4]}
    intervals = {4: [(0.04, 0.06)], 8: [(0.015, 0.025)], 32: [(0.35, 0.45)]}
    result = compare(scores, evaluation_intervals=intervals)
    assert not result.training_noise_measured and not result.claims and not result.differences
    assert result.p_best[8] > 0.99 and sum(result.p_best.values()) == pytest.approx(1.0)
    assert result.interval[8] == pytest.approx((0.015, 0.025))
