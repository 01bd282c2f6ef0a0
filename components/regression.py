"""The nightly regression signal: each factor of a sweep against the previous sweep on the same
data version and parameters (so: another version of the code). A factor regressed when its FID
or KID interval lies wholly above the previous one's, i.e. it got worse beyond the noise of
either; FIDs from different feature extractors are not compared (not on one scale)."""

from __future__ import annotations

from dataclasses import dataclass

import mlflow

from components.contract import TAG_STAGE
from components.params import Params
from components.runs import run_key
from components.sweep_summary import FactorRow, SweepSummary

TAG_COMPARABLE = "latentlab.comparable"  # on sweep runs: data version + params, not code
TAG_COMPARED_WITH = "latentlab.compared_with"  # the previous sweep a sweep was checked against
TAG_REGRESSION_PREFIX = "latentlab.regression.f"  # + f: what got worse, and by how much

# metric -> (value, interval low, interval high) attributes of a FactorRow
INTERVALS = {"FID": ("fid", "fid_ci_low", "fid_ci_high"), "KID": ("kid_mean", "kid_ci_low", "kid_ci_high")}


@dataclass(frozen=True)
class Regression:
    factor: int
    metric: str
    before: tuple[float, float, float]  # value, interval low, interval high
    after: tuple[float, float, float]

    def __str__(self) -> str:
        def shown(v: tuple[float, float, float]) -> str:
            return f"{v[0]:.4g} [{v[1]:.4g}, {v[2]:.4g}]"

        return f"f={self.factor}: {self.metric} {shown(self.after)}, was {shown(self.before)}"


def regressions(previous: SweepSummary, current: SweepSummary) -> list[Regression]:
    """The factors of ``current`` whose FID or KID interval lies wholly above ``previous``'s."""
    before = {row.factor: row for row in previous.rows}
    found = []
    for row in current.rows:
        old = before.get(row.factor)
        if old is None or old.fid_extractor != row.fid_extractor:
            continue
        for metric, attributes in INTERVALS.items():
            was, now = _interval(old, attributes), _interval(row, attributes)
            if was and now and now[1] > was[2]:
                found.append(Regression(row.factor, metric, was, now))
    return found


def _interval(row: FactorRow, attributes: tuple[str, str, str]) -> tuple[float, float, float] | None:
    values = tuple(getattr(row, name) for name in attributes)
    return values if None not in values else None


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
