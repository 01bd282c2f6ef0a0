"""The main job: one data version, then per factor f: autoencoder -> latents -> LDM -> evaluation.

A parent ``sweep`` run nests every child it creates and records, per factor, which runs answer
for it (tag ``latentlab.sweep.f<f>``: JSON of run ids and status), so children reused from an
earlier sweep count too. Factors are independent Prefect tasks (``sweep.workers`` at a time); a
factor that fails is marked and the others finish. The sweep is identified by its data version,
parameters and code: a rerun resumes the same run, redoing only what is missing, and a finished
sweep is returned at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import TerminationSignal
from prefect.task_runners import ThreadPoolTaskRunner

from components.params import Params
from components.runs import (
    FINISHED,
    TAG_BUDGET,
    FactorEntry,
    ReuseOrResume,
    read_factor_entries,
    sweep_key,
    write_factor_entry,
)
from components.tracking import use_experiment
from flows.data import DataVersion, data_flow
from flows.evaluate import evaluate_flow
from flows.extractor import choose_extractor
from flows.ldm import ldm_flow
from flows.report import report_flow


@dataclass(frozen=True)
class SweepRun:
    run_id: str
    factors: dict[int, FactorEntry]
    report: Path | None
    reused: bool

    @property
    def failed(self) -> list[int]:
        return [f for f, entry in self.factors.items() if not entry.finished]


@task(cache_policy=NO_CACHE, task_run_name="factor-f{params.ae.factor}")
def run_factor(params: Params, experiment: str, sweep_run_id: str, data: DataVersion) -> FactorEntry:
    """Autoencoder -> LDM -> evaluation for one f; a failure is returned, not raised, so the
    sweep goes on with the other factors."""
    factor = params.ae.factor
    entry = FactorEntry(status="running")
    try:
        ldm = ldm_flow(params, experiment, sweep_run_id, data)
        entry = replace(entry, ae=ldm.ae_run_id, ldm=ldm.run_id)
        evaluation = evaluate_flow(params, ldm.run_id, experiment, sweep_run_id, data)
        entry = replace(entry, evaluate=evaluation.run_id, status=FINISHED)
    except Exception as exc:  # noqa: BLE001 (one factor must not sink the sweep)
        get_run_logger().error("f=%d failed: %s: %s", factor, type(exc).__name__, exc)
        entry = replace(entry, status=f"failed: {type(exc).__name__}: {exc}"[:500])
    write_factor_entry(sweep_run_id, factor, entry)
    return entry


@flow(name="sweep")
def sweep_flow(params: Params, experiment: str = "latentlab") -> SweepRun:
    """Compare the factors in ``sweep.factors`` under the budget in ``sweep.budget``."""
    logger = get_run_logger()
    per_factor = {f: params.for_factor(f) for f in params.sweep.factors}  # all valid before any work
    data = data_flow(params, experiment)
    recorded = ReuseOrResume.find(use_experiment(experiment), "sweep", sweep_key(params, data.version))
    previous = recorded.resumable or recorded.reusable
    done = read_factor_entries(previous.data.tags) if previous else {}
    todo = [f for f in params.sweep.factors if not (f in done and done[f].finished)]
    if previous and not todo and previous.info.status == "FINISHED":
        logger.info("Sweep %s already finished with these parameters: nothing to do", previous.info.run_id)
        report = report_flow(previous.info.run_id, experiment, log=False)
        return SweepRun(previous.info.run_id, done, report, reused=True)
    choose_extractor(params, data.version, experiment)  # once, before factors race to train it
    if previous:
        logger.info("Resuming sweep %s: f=%s left", previous.info.run_id, ", ".join(map(str, todo)))
    with recorded.start(
        data_version=data.version,
        params=params.flat(),
        run_name=f"sweep-{recorded.key[:6]}",
        tags={TAG_BUDGET: params.budget_description()},
        reopen=previous,
    ) as run:
        sweep_run_id = run.info.run_id
        for factor in todo:
            write_factor_entry(sweep_run_id, factor, FactorEntry())
        results = run_factors(todo, per_factor, experiment, sweep_run_id, data, params.sweep.workers)
        factors = {**done, **results}
        for factor, entry in sorted(factors.items()):
            logger.info("f=%d: %s", factor, entry.status)
        report = report_flow(sweep_run_id, experiment)
    return SweepRun(sweep_run_id, factors, report, reused=False)


def run_factors(
    todo: list[int], per_factor: dict[int, Params], experiment: str, sweep_run_id: str, data: DataVersion, workers: int
) -> dict[int, dict]:
    """Each factor's entry. One at a time in this thread, or ``workers`` at once in threads
    (factors are independent; a deployment can spread them). One worker stays in the main
    thread because PyTorch's OpenMP runs a 2-thread training step ~35 % slower from a worker
    thread here (measured), which would cost every factor a third of its time budget.

    On Ctrl-C or SIGTERM the sweep exits at once: worker threads cannot be interrupted and
    waiting for them could take an hour; everything is resumable (checkpoints, runs left
    unfinished are reopened), so a hard exit loses nothing finished."""
    arguments = {
        f: {"params": per_factor[f], "experiment": experiment, "sweep_run_id": sweep_run_id, "data": data} for f in todo
    }
    try:
        if workers == 1:
            return {f: run_factor(**arguments[f]) for f in todo}
        with ThreadPoolTaskRunner(max_workers=workers) as runner:
            futures = {f: runner.submit(run_factor, arguments[f]) for f in todo}
            return {f: future.result() for f, future in futures.items()}
    # Ctrl-C; SIGTERM, as Prefect raises it; Lightning's exit after it handled a Ctrl-C itself
    except (KeyboardInterrupt, TerminationSignal, SystemExit) as exc:
        print(f"latentlab sweep: {type(exc).__name__}: stopped; finished work is kept, rerun to resume.", flush=True)
        os._exit(130)
