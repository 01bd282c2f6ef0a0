"""The main job: one data version, then per factor f: autoencoder -> latents -> LDM -> evaluation.

A parent ``sweep`` run nests every child it creates and records, per factor, which runs answer
for it (tag ``latentlab.sweep.f<f>``: JSON of run ids and status; ``...f<f>.r<r>`` for repeat r
of ``sweep.seeds``), so children reused from an earlier sweep count too. Factors are independent Prefect tasks (``sweep.workers`` at a time); a
factor that fails is marked and the others finish. The sweep is identified by its data version,
parameters and code: a rerun resumes the same run, redoing only what is missing, and a finished
sweep is returned at once.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.exceptions import TerminationSignal
from prefect.futures import wait
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from components import ownership, progress, workspace
from components.errors import Reported
from components.params import Params
from components.regression import (
    TAG_COMPARABLE,
    TAG_COMPARED_WITH,
    TAG_REGRESSION_PREFIX,
    comparable_key,
    previous_sweep,
    regressions,
)
from components.runs import (
    FINISHED,
    TAG_AE_RUN,
    TAG_BUDGET,
    FactorEntry,
    read_sweep_entries,
    write_factor_entry,
)
from components.sweep_summary import collect
from components.tracking import use_experiment
from flows.cancellation import cancel_flow_runs
from flows.data import data_flow, data_version_here
from flows.extractor import choose_extractor
from flows.pipeline import STAGES, evaluate_flow, ldm_flow
from flows.report import report_flow
from flows.stage import DataVersion, Stage, log, run_stage

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
        return {_name(cell): entry for cell, entry in sorted(self.entries.items()) if not entry.finished}


def _name(cell: Cell) -> str:
    factor, repeat = cell
    return f"f={factor}" + (f" (repeat {repeat})" if repeat else "")


class FactorFailed(Reported):
    """A factor that did not finish: its Prefect task or flow run ends Failed with this message."""


def _factor(params: Params, experiment: str, sweep_run_id: str, data: DataVersion, repeat: int = 0) -> FactorEntry:
    """Autoencoder -> LDM -> evaluation for one f and seed, its entry recorded on the sweep run.
    A failure is recorded, then raised: Prefect shows the factor Failed, the sweep goes on."""
    factor = params.ae.factor
    entry = FactorEntry(status="running")
    try:
        with progress.factor(_name((factor, repeat))):
            ldm = ldm_flow(params, experiment, sweep_run_id, data)
            entry = replace(entry, ae=ldm.tags.get(TAG_AE_RUN, ""), ldm=ldm.run_id)
            evaluation = evaluate_flow(params, ldm.run_id, experiment, sweep_run_id, data)
            entry = replace(entry, evaluate=evaluation.run_id, status=FINISHED)
    except Exception as exc:  # noqa: BLE001 (one factor must not sink the sweep)
        get_run_logger().error("f=%d failed: %s: %s", factor, type(exc).__name__, exc)
        entry = replace(entry, status=f"failed: {type(exc).__name__}: {exc}"[:500])
        write_factor_entry(sweep_run_id, factor, entry, repeat)
        raise FactorFailed(f"{_name((factor, repeat))} {entry.status}") from None
    write_factor_entry(sweep_run_id, factor, entry, repeat)
    return entry


FACTOR_RUN_NAME = "factor-f{params.ae.factor}-seed{params.seed}"
# One factor in this process, as a task of the sweep's flow run.
run_factor = task(_factor, name="factor", cache_policy=NO_CACHE, task_run_name=FACTOR_RUN_NAME)


@flow(name="factor", flow_run_name=FACTOR_RUN_NAME)
def factor_flow(params: Params, experiment: str, sweep_run_id: str, data: DataVersion, repeat: int = 0) -> FactorEntry:
    """One factor as its own flow run (the ``factor`` deployment), on any worker of the pool, in
    the project the worker was started in: it reads the sweep's data version from that
    project's ``data/`` if it holds it, else from the DVC remote (``data.remote``)."""
    with workspace.reading_data(data_version_here(params.data, data.version)):
        return _factor(params, experiment, sweep_run_id, data, repeat)


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
    beyond its interval is tagged on the sweep run (``latentlab.regression.f<f>``) and logged."""
    logger = get_run_logger()
    previous = previous_sweep(experiment_id, comparable, sweep_run_id)
    if previous is None:
        return []
    client = mlflow.MlflowClient()
    client.set_tag(sweep_run_id, TAG_COMPARED_WITH, previous)
    found = regressions(collect(previous, images=False), collect(sweep_run_id, images=False))
    for factor in sorted({r.factor for r in found}):
        said = "; ".join(str(r) for r in found if r.factor == factor)
        client.set_tag(sweep_run_id, f"{TAG_REGRESSION_PREFIX}{factor}", said)
    for regression in found:
        logger.warning("Worse than sweep %s beyond the intervals: %s", previous, regression)
    if not found:
        logger.info("No factor got worse than in sweep %s (same data and parameters) beyond its interval", previous)
    return [str(r) for r in found]


@flow(name="sweep")
def sweep_flow(
    params: Params,
    experiment: str = "latentlab",
    factor_deployment: str | None = None,
    fail_on_regression: bool = False,
) -> SweepRun | State:
    """Compare the factors in ``sweep.factors`` under the budget in ``sweep.budget``; each factor
    in this process, or (``factor_deployment``) as a flow run of that deployment. Returns the
    sweep, or a Failed state that holds it when a factor did not finish or (``fail_on_regression``)
    got worse than in the previous sweep on the same data and parameters (call with
    ``return_state=True`` and read ``state.result(raise_on_failure=False)``)."""
    cells = [(f, r) for r in range(params.sweep.seeds) for f in params.sweep.factors]  # every f, then again
    per_cell = {(f, r): params.for_factor(f, r) for f, r in cells}  # all valid before any work
    plan = progress.SweepPlan(
        {_name(cell): _training_budget_s(per_cell[cell]) for cell in cells},
        params.sweep.workers,
        pixel_space=[_name(cell) for cell in cells if cell[0] == 1],
    )
    with progress.sweep_plan(plan):
        result = _sweep(params, experiment, cells, per_cell, plan, factor_deployment)
    if result.failed:
        return Failed(message=f"{', '.join(result.failed)} did not finish; rerun to retry", data=result)
    if fail_on_regression and result.regressions:
        return Failed(message="worse than the previous sweep: " + "; ".join(result.regressions), data=result)
    return result


def _training_budget_s(params: Params) -> float | None:
    """The training seconds a factor is given (autoencoder and LDM), or None for a step budget."""
    minutes = [params.ldm.max_minutes] + ([params.ae.max_minutes] if params.ae.factor > 1 else [])
    return None if None in minutes else 60 * sum(minutes)


class SweepStage(Stage):
    """The sweep's own run: every (factor, repeat) cell's runs recorded on it, then the report.
    A finished sweep with a cell that did not finish is reopened to redo just that cell."""

    name = "sweep"
    code = tuple(code for stage in STAGES for code in stage.code) + ("components.report",)
    sections = ("seed", "data", "ae", "ldm", "eval", "sweep", "reproduce")
    orchestrates = True

    def __init__(self, params: Params, data: DataVersion, cells: list[Cell], per_cell: dict[Cell, Params], **how: Any):
        super().__init__(params, data, how.pop("experiment"))
        self.cells, self.per_cell, self.how = cells, per_cell, how
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
        self.how["plan"].keep([])
        self.report = report_flow(run.info.run_id, self.experiment, log=False)

    def prepare(self, resumed: Run | None) -> None:
        self.todo = self.left(resumed)
        self.how["plan"].keep([_name(cell) for cell in self.todo])
        choose_extractor(self.params, self.data, self.experiment)  # once, before factors race to train it
        if resumed:
            log.info("Resuming sweep %s: %s left", resumed.info.run_id, ", ".join(map(_name, self.todo)))

    def tags(self) -> dict[str, str]:
        return {TAG_BUDGET: self.params.budget_description(), TAG_COMPARABLE: self.comparable}

    def train(self, run_id: str, resuming: bool) -> None:
        for factor, repeat in self.todo:
            write_factor_entry(run_id, factor, FactorEntry(), repeat)
        how = self.how
        run_factors(self.todo, self.per_cell, self.experiment, run_id, self.data, how["workers"], how["deployment"])

    def publish(self, run_id: str) -> None:
        for cell, entry in sorted(read_sweep_entries(mlflow.get_run(run_id).data.tags).items()):
            log.info("%s: %s", _name(cell), entry.status)
        self.report = report_flow(run_id, self.experiment)


def _sweep(
    params: Params,
    experiment: str,
    cells: list[Cell],
    per_cell: dict[Cell, Params],
    plan: progress.SweepPlan,
    factor_deployment: str | None,
) -> SweepRun:
    data = data_flow(params, experiment)
    how = {"plan": plan, "workers": params.sweep.workers, "deployment": factor_deployment}
    stage = SweepStage(params, data, cells, per_cell, experiment=experiment, **how)
    run = run_stage(stage)
    entries = read_sweep_entries(run.tags)
    complete = all(entries.get(cell, FactorEntry()).finished for cell in cells)
    found = (
        []
        if run.reused or not complete
        else check_regressions(use_experiment(experiment), run.run_id, stage.comparable)
    )
    return SweepRun(run.run_id, entries, stage.report, reused=run.reused, regressions=found)


def run_factors(
    todo: list[Cell],
    per_cell: dict[Cell, Params],
    experiment: str,
    sweep_run_id: str,
    data: DataVersion,
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
                        runner.submit(dispatch_factor, {"deployment": deployment, "name": _name(c), "arguments": a})
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
