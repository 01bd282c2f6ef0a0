"""The sweep report, from MLflow alone: table, Figures 6/7, PSNR/FID vs f, samples, verdict.

Written to ``reports/<date>-sweep-<run id's first 8>/`` and logged to the sweep run under ``report/``;
``latentlab report --run SWEEP_RUN_ID`` regenerates it at any time.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from components import progress, workspace
from components.contract import LDM_MODELS
from components.report import log_report, write_report
from components.runs import run_of_stage
from components.sweep_summary import SweepSummary, collect
from components.tracking import point_aliases, use_experiment
from components.verdict import best_factor


def point_ldm_aliases(summary: SweepSummary) -> None:
    """``models:/ldm@f<f>``: the version this sweep evaluated for f; ``@best``: the f most likely best (the verdict's P(best)).
    A task's sweep points its own model's (``ldm-superres@f4``)."""
    name = LDM_MODELS.get(summary.task, LDM_MODELS["generate"])
    runs = {f"f{row.factor}": row.runs["ldm"] for row in summary.rows if "ldm" in row.runs}
    best = best_factor(summary)
    if best is not None and "ldm" in best.runs:
        runs["best"] = best.runs["ldm"]
    pointed = point_aliases(name, runs)
    if pointed:
        get_run_logger().info("Model aliases: %s", ", ".join(f"{name}@{a} = v{v}" for a, v in pointed.items()))


@flow(name="report")
def report_flow(sweep_run_id: str, experiment: str = "latentlab", log: bool = True) -> Path:
    """Build the report of sweep run ``sweep_run_id``; return the path of its report.md."""
    use_experiment(experiment)
    run_of_stage(sweep_run_id, ("sweep",), "latentlab report --run")  # a clear error if it is not one
    with progress.phase("report"):
        summary = collect(sweep_run_id)
        out_dir = workspace.report_dir(sweep_run_id, summary.started_ms)
        path = write_report(summary, out_dir)
        if log:
            log_report(sweep_run_id, out_dir, summary)
            point_ldm_aliases(summary)
    get_run_logger().info("Report written to %s", path)
    return path
