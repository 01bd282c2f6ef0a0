"""The recorded runs, newest first, as ``latentlab runs`` lists them: what each is (stage, f),
how it ended, its headline number and its age, from one search of the tracking store."""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlflow

from components.contract import TAG_FACTOR, TAG_STAGE


@dataclass(frozen=True)
class RecentRun:
    run_id: str
    name: str
    stage: str
    factor: str  # "8"; a sweep's factors "1,2,4"; "" where none
    status: str  # MLflow's: RUNNING, FINISHED, FAILED, KILLED
    fid: float | None  # an evaluate run's (the LDM's own, from few samples during training, is not shown)
    psnr: float | None  # an autoencoder's (an evaluate run copies it)
    started_ms: int


def recent(experiment: str, limit: int = 20, stage: str | None = None) -> list[RecentRun]:
    """Up to ``limit`` runs of ``experiment`` (of ``stage`` only, if given), newest first; none
    when the experiment does not exist yet."""
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return []
    where = f"tags.`{TAG_STAGE}` = '{stage}'" if stage else ""
    runs = mlflow.MlflowClient().search_runs(
        [found.experiment_id], where, max_results=limit, order_by=["attributes.start_time DESC"]
    )
    out = []
    for run in runs:
        tags, kind = run.data.tags, run.data.tags.get(TAG_STAGE, "")
        factor = tags.get(TAG_FACTOR, "")
        if kind == "sweep":
            factor = run.data.params.get("sweep.factors", "").strip("[]").replace(" ", "")
        metrics = run.data.metrics
        fid = metrics.get("fid") if kind == "evaluate" else None
        psnr = metrics.get("psnr") if kind in ("autoencoder", "evaluate") else None
        out.append(
            RecentRun(
                run.info.run_id,
                run.info.run_name or "",
                kind,
                factor,
                run.info.status,
                fid,
                psnr,
                run.info.start_time or 0,
            )
        )
    return out


def age(started_ms: int, now: float | None = None) -> str:
    """``"42 s"``, ``"5 min"``, ``"3 h"``, ``"2 d"``: how long ago a run started."""
    seconds = max((now if now is not None else time.time()) - started_ms / 1000, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f} {unit}"
    return f"{seconds:.0f} s"
