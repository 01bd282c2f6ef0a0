"""The nightly regression signal: worse beyond training and evaluation noise, or not."""

from components.regression import regressions
from components.sweep_summary import FactorRow, SweepSummary


def sweep(*rows: FactorRow) -> SweepSummary:
    return SweepSummary(run_id="r", run_name="sweep", data_version="v", budget=None, rows=list(rows))


def row(factor: int, kids: list[float], extractor: str = "cnn:1") -> FactorRow:
    """One factor with one evaluated model per seed, scored ``kids``."""
    first, *repeats = (FactorRow(factor, kid_mean=k, fid_extractor=extractor) for k in kids)
    first.repeats = repeats
    return first


def test_a_factor_regressed_only_when_its_seeds_got_worse_beyond_their_spread():
    before = sweep(row(4, [0.050, 0.052, 0.051]), row(8, [0.030, 0.060, 0.045]), row(16, [0.10, 0.11, 0.105]))
    after = sweep(
        row(4, [0.090, 0.092, 0.091]),  # worse, far beyond the seeds' spread
        row(8, [0.050, 0.080, 0.020]),  # worse on the mean, within the seeds' spread: noise
        row(16, [0.05, 0.051, 0.052]),  # better
    )
    (found,) = regressions(before, after)
    assert found.factor == 4 and found.difference.low > 0
    assert str(found).startswith("f=4: KID 0.091 over 3 seeds, was 0.051 over 3 (difference 0.04 [")


def test_nothing_is_flagged_with_one_seed_or_across_extractors():
    before = sweep(row(4, [0.05, 0.051]), row(8, [0.05]), row(16, [0.05, 0.051]))
    after = sweep(
        row(4, [0.3, 0.31], extractor="cnn:2"),  # another feature network: another scale
        row(8, [0.3]),  # one seed: training noise unmeasured
        row(16, [0.3, 0.31]),  # worse beyond the noise
    )
    assert [r.factor for r in regressions(before, after)] == [16]
    assert regressions(sweep(), after) == []  # a factor the previous sweep did not have
