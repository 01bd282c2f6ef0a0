"""The nightly regression signal: worse beyond the intervals, or not."""

from components.regression import regressions
from components.sweep_summary import FactorRow, SweepSummary


def sweep(*rows: FactorRow) -> SweepSummary:
    return SweepSummary(run_id="r", run_name="sweep", data_version="v", budget=None, rows=list(rows))


def row(factor: int, fid: tuple[float, float, float], kid=(0.1, 0.05, 0.15), extractor="cnn:1") -> FactorRow:
    return FactorRow(
        factor,
        fid=fid[0],
        fid_ci_low=fid[1],
        fid_ci_high=fid[2],
        kid_mean=kid[0],
        kid_ci_low=kid[1],
        kid_ci_high=kid[2],
        fid_extractor=extractor,
    )


def test_a_factor_regressed_only_when_its_interval_lies_wholly_above_the_previous_one():
    before = sweep(row(4, (10.0, 9.0, 11.0)), row(8, (10.0, 9.0, 11.0)), row(16, (10.0, 9.0, 11.0)))
    after = sweep(
        row(4, (13.0, 11.5, 14.0)),  # worse beyond both intervals
        row(8, (12.0, 10.5, 13.5)),  # worse, but the intervals overlap: noise
        row(16, (5.0, 4.0, 6.0)),  # better
    )
    (found,) = regressions(before, after)
    assert (found.factor, found.metric) == (4, "FID")
    assert str(found) == "f=4: FID 13 [11.5, 14], was 10 [9, 11]"


def test_kid_counts_too_and_nothing_is_compared_across_extractors_or_without_intervals():
    before = sweep(row(4, (10.0, 9.0, 11.0)), row(8, (10.0, 9.0, 11.0)), row(16, (10.0, 9.0, 11.0)))
    after = sweep(
        row(4, (10.0, 9.0, 11.0), kid=(0.3, 0.2, 0.4)),  # KID worse beyond its interval
        row(8, (30.0, 29.0, 31.0), extractor="cnn:2"),  # another feature network: another scale
        row(16, (30.0, None, None)),  # no interval recorded
    )
    assert [(r.factor, r.metric) for r in regressions(before, after)] == [(4, "KID")]
    assert regressions(sweep(), after) == []  # a factor the previous sweep did not have
