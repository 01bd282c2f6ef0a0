"""Numbers a reviewer would accept: per-image PSNR, and bootstrap intervals that contain the
truth for distributions whose FID and KID are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.metrics import bootstrap_intervals, psnr_ssim


def test_psnr_is_the_mean_of_per_image_psnr_and_the_pooled_figure_is_kept():
    original = torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)
    reconstruction = original.clone()
    reconstruction[0] += 1  # mse (1/255)^2
    reconstruction[1] += 10  # mse (10/255)^2
    mse = np.array([1.0, 100.0]) / 255**2
    metrics = psnr_ssim(original, reconstruction)
    assert metrics["psnr"] == pytest.approx(np.mean(-10 * np.log10(mse)), rel=1e-5)
    assert metrics["psnr_pooled"] == pytest.approx(-10 * np.log10(mse.mean()), rel=1e-5)
    assert metrics["psnr"] > metrics["psnr_pooled"]  # the pooled figure is dominated by the worst image


D = 4
SHIFT = np.array([0.6, 0.0, 0.0, 0.0])


def _true_kid(rng: np.random.Generator, pairs: int = 400_000) -> float:
    """MMD^2 of N(0, I) and N(SHIFT, I) under KID's kernel (x.y / d + 1)^3, by Monte Carlo."""

    def k(a, b):
        return ((a * b).sum(1) / D + 1) ** 3

    x, x2 = rng.normal(size=(2, pairs, D))
    y, y2 = rng.normal(size=(2, pairs, D)) + SHIFT
    return float(k(x, x2).mean() + k(y, y2).mean() - 2 * k(x, y).mean())


def test_bootstrap_intervals_contain_the_true_fid_and_kid_of_known_distributions():
    rng = np.random.default_rng(0)
    true_fid = float(SHIFT @ SHIFT)  # equal covariances: only the means differ
    true_kid = _true_kid(rng)
    covered = {"fid": 0, "kid": 0}
    repeats = 12
    for i in range(repeats):
        real = torch.from_numpy(rng.normal(size=(1500, D)))
        fake = torch.from_numpy(rng.normal(size=(300, D)) + SHIFT)
        ci = bootstrap_intervals(real, fake, rounds=150, seed=i)
        assert ci["fid_ci_low"] <= ci["fid_ci_high"] and ci["kid_ci_low"] <= ci["kid_ci_high"]
        covered["fid"] += ci["fid_ci_low"] <= true_fid <= ci["fid_ci_high"]
        covered["kid"] += ci["kid_ci_low"] <= true_kid <= ci["kid_ci_high"]
    # 95 % intervals: 12 of 12 expected to cover about 11.4 times; fewer than 9 would be a broken interval
    assert covered["fid"] >= 9 and covered["kid"] >= 9, covered


def test_bootstrap_intervals_narrow_with_more_samples_and_separate_distinct_sets():
    rng = np.random.default_rng(1)
    real = torch.from_numpy(rng.normal(size=(2000, D)))

    def width(n: int, shift: np.ndarray) -> tuple[float, dict]:
        ci = bootstrap_intervals(real, torch.from_numpy(rng.normal(size=(n, D)) + shift), rounds=100, seed=n)
        return ci["fid_ci_high"] - ci["fid_ci_low"], ci

    small, _ = width(100, SHIFT)
    large, near = width(1600, SHIFT)
    assert large < 0.5 * small
    _, far = width(1600, 2 * SHIFT)
    assert near["fid_ci_high"] < far["fid_ci_low"]  # FID 0.36 vs 1.44: told apart
