"""The sweep stage: the main job's own run, over every factor f (and repeat) of ``sweep.factors``.

A parent ``sweep`` run nests every child it creates and records, per factor, which runs answer
for it (tag ``latentlab.sweep.f<f>``: JSON of each stage's run id and the status;
``...f<f>.r<r>`` for repeat r of ``sweep.seeds``), so children reused from an earlier sweep count
too. Factors are independent Prefect tasks (``sweep.workers`` at a time) or flow runs of a
deployment; a factor that fails is marked and the others finish. The sweep is identified by its
data version, parameters and code: a rerun resumes the same run, redoing only what is missing,
and a finished sweep is returned at once. What one factor runs is composed in
``flows.pipeline`` (``factor``), which hands it to this stage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.exceptions import TerminationSignal
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from components import ownership, progress
from components.contract import TAG_BUDGET, TAG_CHANGED_PARAMS, TAG_TASK
from components.errors import Reported
from components.features import Extractor
from components.params import Params
from components.presets import changed_from_defaults
from components.regression import (
    TAG_COMPARABLE,
    TAG_COMPARED_WITH,
    TAG_REGRESSION_PREFIX,
    comparable_key,
    previous_sweep,
    regressions,
)
from components.sweep_summary import FactorEntry, collect, read_sweep_entries, write_factor_entry
from components.tracking import use_experiment
from flows.cancellation import cancel_flow_runs
from flows.report import report_flow
from flows.stage import DataVersion, Stage, StageRun, log

MAX_TAG = 5000  # characters of a tag value every MLflow store accepts
Cell = tuple[int, int]  # (factor, repeat): repeat r trains with seed + r


@dataclass(frozen=True)
class SweepRun:
    run_id: str
    entries: dict[Cell, FactorEntry]
    report: Path | None
    reused: bool
    regressions: list[str] = field(default_factory=list)  # against the previous comparable sweep

    @property
    def failed(self) -> dict[str, FactorEntry]:
        """Unfinished entries by name: "f=8", or "f=8 (repeat 1)" for a later seed."""
        return {cell_name(cell): entry for cell, entry in sorted(self.entries.items()) if not entry.finished}


def cell_name(cell: Cell) -> str:
    """ "f=8", or "f=8 (repeat 1)" for a later seed."""
    factor, repeat = cell
    return f"f={factor}" + (f" (repeat {repeat})" if repeat else "")


class FactorFailed(Reported):
    """A factor that did not finish: its Prefect task or flow run ends Failed with this message."""


@task(cache_policy=NO_CACHE, task_run_name="dispatch-{name}")
def dispatch_factor(deployment: str, name: str, arguments: dict[str, Any]) -> None:
    """Run one factor as a flow run of ``deployment`` and wait for it; Failed if it did not finish."""
    parameters = {**arguments, "params": arguments["params"].model_dump(mode="json"), "data": asdict(arguments["data"])}
    run = run_deployment(deployment, parameters=parameters, timeout=None, poll_interval=2)
    if not run.state or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        raise FactorFailed(f"{name}: flow run {run.name} ended {state}: {run.state.message if run.state else ''}")


@task(cache_policy=NO_CACHE)
def check_regressions(experiment_id: str, sweep_run_id: str, comparable: str) -> list[str]:
    """Each factor against the previous sweep on the same data and parameters; what got worse
    beyond training and evaluation noise is tagged on the sweep run (``latentlab.regression.f<f>``)
    and logged. A sweep with one seed per factor cannot tell, and says so."""
    logger = get_run_logger()
    previous = previous_sweep(experiment_id, comparable, sweep_run_id)
    if previous is None:
        return []
    client = mlflow.MlflowClient()
    client.set_tag(sweep_run_id, TAG_COMPARED_WITH, previous)
    before, now = collect(previous, images=False), collect(sweep_run_id, images=False)
    if max((len(r.all_seeds) for r in now.rows), default=0) < 2:
        logger.info("Not compared with sweep %s: with one seed per factor training noise is unmeasured", previous)
        return []
    found = regressions(before, now)
    for regression in found:
        client.set_tag(sweep_run_id, f"{TAG_REGRESSION_PREFIX}{regression.factor}", str(regression))
        logger.warning("Worse than sweep %s beyond the noise: %s", previous, regression)
    if not found:
        logger.info("No factor got worse than in sweep %s (same data and parameters) beyond the noise", previous)
    return [str(r) for r in found]


def plan(params: Params) -> tuple[list[Cell], dict[Cell, Params], progress.SweepPlan]:
    """The sweep's cells (every f, then again per repeat), each cell's parameters (all checked
    before any work starts) and the progress plan with each cell's training budget."""
    cells = [(f, r) for r in range(params.sweep.seeds) for f in params.sweep.factors]
    per_cell = {(f, r): params.for_factor(f, r) for f, r in cells}
    budgets = {cell_name(cell): _training_budget_s(per_cell[cell]) for cell in cells}
    pixel_space = [cell_name(cell) for cell in cells if cell[0] == 1]
    return cells, per_cell, progress.SweepPlan(budgets, params.sweep.workers, pixel_space=pixel_space)


def _training_budget_s(params: Params) -> float | None:
    """The training seconds a factor is given (autoencoder and LDM), or None for a step budget."""
    minutes = [params.ldm.max_minutes] + ([params.ae.max_minutes] if params.ae.factor > 1 else [])
    return None if None in minutes else 60 * sum(minutes)


class SweepStage(Stage):
    """The sweep's own run: every (factor, repeat) cell's runs recorded on it, then the report.
    A finished sweep with a cell that did not finish is reopened to redo just that cell."""

    name = "sweep"
    code = ("flows.pipeline",)  # everything a sweep runs: every stage, composed
    sections = ("seed", "data", "ae", "ldm", "eval", "sweep", "reproduce")
    orchestrates = True

    def __init__(
        self,
        params: Params,
        data: DataVersion,
        experiment: str,
        *,
        cells: list[Cell],
        per_cell: dict[Cell, Params],
        plan: progress.SweepPlan,
        run_factor: Task[..., FactorEntry],
        extractor: Callable[[], Extractor],
        deployment: str | None = None,
    ):
        """``run_factor``: one cell in this process (``flows.pipeline.factor``); ``deployment``:
        run each cell as a flow run of it instead; ``extractor``: gives the FID network, trained
        once here before the factors would race to train it."""
        super().__init__(params, data, experiment)
        self.cells, self.per_cell, self.plan = cells, per_cell, plan
        self.run_factor, self.extractor, self.deployment = run_factor, extractor, deployment
        self.comparable = comparable_key(params, data.version)

    def run_name(self) -> str:
        return f"sweep-{self.key()[:6]}"

    def logged_params(self) -> dict[str, Any]:
        return self.params.flat()

    def left(self, run: Run | None) -> list[Cell]:
        done = read_sweep_entries(run.data.tags) if run else {}
        return [cell for cell in self.cells if not (cell in done and done[cell].finished)]

    def complete(self, run: Run) -> bool:
        return not self.left(run)

    def reuse(self, run: Run) -> None:
        log.info("Sweep %s already finished with these parameters: nothing to do", run.info.run_id)
        self.plan.keep([])
        self.report = report_flow(run.info.run_id, self.experiment, log=False)

    def prepare(self, resumed: Run | None) -> None:
        self.todo = self.left(resumed)
        self.plan.keep([cell_name(cell) for cell in self.todo])
        self.extractor()
        if resumed:
            log.info("Resuming sweep %s: %s left", resumed.info.run_id, ", ".join(map(cell_name, self.todo)))

    def tags(self) -> dict[str, str]:
        changed = json.dumps(changed_from_defaults(self.params))
        return {
            TAG_BUDGET: self.params.budget_description(),
            TAG_TASK: self.params.ldm.task,
            TAG_COMPARABLE: self.comparable,
            TAG_CHANGED_PARAMS: changed if len(changed) <= MAX_TAG else "(too many to tag: see the run's parameters)",
        }

    def train(self, run_id: str, resuming: bool) -> None:
        for factor, repeat in self.todo:
            write_factor_entry(run_id, factor, FactorEntry(), repeat)
        workers = self.params.sweep.workers
        run_factors(
            self.todo, self.per_cell, self.experiment, run_id, self.data, self.run_factor, workers, self.deployment
        )

    def publish(self, run_id: str) -> None:
        for cell, entry in sorted(read_sweep_entries(mlflow.get_run(run_id).data.tags).items()):
            log.info("%s: %s", cell_name(cell), entry.status)
        self.report = report_flow(run_id, self.experiment)

    def outcome(self, run: StageRun) -> SweepRun:
        """The sweep as its caller sees it; a newly finished sweep is checked for regressions."""
        entries = read_sweep_entries(run.tags)
        complete = all(entries.get(cell, FactorEntry()).finished for cell in self.cells)
        checked = not run.reused and complete
        found = check_regressions(use_experiment(self.experiment), run.run_id, self.comparable) if checked else []
        return SweepRun(run.run_id, entries, self.report, reused=run.reused, regressions=found)


def run_factors(
    todo: list[Cell],
    per_cell: dict[Cell, Params],
    experiment: str,
    sweep_run_id: str,
    data: DataVersion,
    run_factor: Task[..., FactorEntry],
    workers: int,
    deployment: str | None = None,
) -> dict[Cell, FactorEntry]:
    """Each (factor, repeat)'s entry, as the factors recorded it on the sweep run. One at a time
    in this thread, ``workers`` at once in threads, or all at once as flow runs of
    ``deployment`` (its work pool's workers decide how many run together). One local worker
    stays in the main thread because PyTorch's OpenMP runs a 2-thread training step ~35 %
    slower from a worker thread here (measured), which would cost every factor a third of its
    time budget.

    On Ctrl-C or SIGTERM the sweep exits at once: worker threads cannot be interrupted and
    waiting for them could take an hour. Its MLflow runs are closed KILLED and its Prefect flow
    runs Cancelled first; everything is resumable (checkpoints, unfinished runs are reopened)."""
    arguments = {
        cell: {
            "params": per_cell[cell],
            "experiment": experiment,
            "sweep_run_id": sweep_run_id,
            "data": data,
            "repeat": cell[1],
        }
        for cell in todo
    }
    try:
        if deployment is None and workers == 1:
            for cell in todo:
                run_factor(**arguments[cell], return_state=True)  # a Failed state; the next goes on
        else:
            with ThreadPoolTaskRunner(max_workers=len(todo) if deployment else workers) as runner:
                if deployment:
                    futures = [
                        runner.submit(dispatch_factor, {"deployment": deployment, "name": cell_name(c), "arguments": a})
                        for c, a in arguments.items()
                    ]
                else:
                    futures = [runner.submit(run_factor, a) for a in arguments.values()]
                wait(futures)
    # Ctrl-C; SIGTERM, as Prefect raises it; Lightning's exit after it handled a Ctrl-C itself
    except (KeyboardInterrupt, TerminationSignal, SystemExit) as exc:
        reason = f"stopped by {type(exc).__name__}"
        ownership.close_mine(reason)
        cancel_flow_runs(reason)
        print(f"latentlab sweep: {reason}; finished work is kept, rerun to resume.", flush=True)
        os._exit(130)
    recorded = read_sweep_entries(mlflow.MlflowClient().get_run(sweep_run_id).data.tags)
    return {cell: recorded.get(cell, FactorEntry(status="failed: it recorded nothing")) for cell in todo}
