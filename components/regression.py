"""The nightly regression signal: each factor of a sweep against the previous sweep on the same
data version and parameters (so: another version of the code), on the verdict's basis: every
seed's KID, Welch's test of the difference of means, Holm's correction over the factors compared
(``components.comparison``). A factor regressed when its KID got worse beyond training and
evaluation noise. Nothing is flagged where either sweep has one seed of a factor (training noise
unmeasured: a second seed alone has scored outside one model's intervals), nor across feature
extractors (not on one scale)."""

from __future__ import annotations

from dataclasses import dataclass

import mlflow

from components.comparison import METRIC, Difference, holm, welch
from components.contract import TAG_STAGE
from components.params import Params
from components.runs import run_key
from components.sweep_summary import FactorRow, SweepSummary

TAG_COMPARABLE = "latentlab.comparable"  # on sweep runs: data version + params, not code
TAG_COMPARED_WITH = "latentlab.compared_with"  # the previous sweep a sweep was checked against
TAG_REGRESSION_PREFIX = "latentlab.regression.f"  # + f: what got worse, and by how much
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Regression:
    factor: int
    before: list[float]  # each seed's KID
    after: list[float]
    difference: Difference  # after - before, at Holm's level

    def __str__(self) -> str:
        d = self.difference
        return (
            f"f={self.factor}: {METRIC} {_mean(self.after):.4g} over {len(self.after)} seeds, was {_mean(self.before):.4g} "
            f"over {len(self.before)} (difference {d.estimate:.3g} [{d.low:.3g}, {d.high:.3g}] at {d.level:.1%})"
        )


def regressions(previous: SweepSummary, current: SweepSummary) -> list[Regression]:
    """The factors of ``current`` whose KID got worse than ``previous``'s beyond the noise."""
    before = {row.factor: row for row in previous.rows}
    tests, scores = [], {}
    for row in current.rows:
        old = before.get(row.factor)
        if old is None or old.fid_extractor != row.fid_extractor:
            continue
        was, now = _seed_scores(old), _seed_scores(row)
        if len(was) < 2 or len(now) < 2:
            continue
        scores[row.factor] = (was, now)
        tests.append((row.factor, "previous", *welch(now, was)))
    return [Regression(d.a, *scores[d.a], d) for d in holm(tests, 1 - CONFIDENCE) if d.claimed and d.estimate > 0]


def _seed_scores(row: FactorRow) -> list[float]:
    return [x.kid_mean for x in row.all_seeds if x.kid_mean is not None]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def comparable_key(params: Params, data_version: str) -> str:
    """What two sweeps must share to be compared: the data version and every parameter."""
    return run_key("comparable", data_version, params.model_dump(mode="json"))


def previous_sweep(experiment_id: str, comparable: str, before_run_id: str) -> str | None:
    """The newest finished sweep with the same data version and parameters, other than ``before_run_id``."""
    runs = mlflow.search_runs(
        [experiment_id],
        f"tags.`{TAG_STAGE}` = 'sweep' and tags.`{TAG_COMPARABLE}` = '{comparable}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=2,
        output_format="list",
    )
    return next((run.info.run_id for run in runs if run.info.run_id != before_run_id), None)
