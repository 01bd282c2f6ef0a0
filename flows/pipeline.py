"""The flows that compose stages, and the registry of stages.

Each flow is a few lines: run the upstream stage, hand its run to the next (``flows.stage``),
and give each stage what it needs from others (the FID network, what one factor runs). Stages
never import each other; ``latentlab``'s commands and deployments reach them through these flows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed, State

from components import progress, workspace
from components.contract import TAG_AE_RUN
from components.credentials import redact
from components.errors import UserError
from components.features import Extractor
from components.first_stage import FirstStageRef
from components.params import Params, params_from_run
from components.runs import run_of_stage
from components.sweep_summary import FINISHED, FactorEntry, write_factor_entry
from flows.autoencoder import AutoencoderStage, first_stage
from flows.data import DataStage, data_flow, data_version_here
from flows.evaluate import EvaluateStage, check_data_version
from flows.extractor import ExtractorStage, choose_extractor
from flows.ldm import LDMStage
from flows.stage import DataVersion, StageRun, run_stage
from flows.sweep import FactorFailed, SweepRun, SweepStage, cell_name, plan

# Every stage: adding one is its own module, its params section and a line here.
STAGES = (DataStage, ExtractorStage, AutoencoderStage, LDMStage, EvaluateStage, SweepStage)


def extractor_of(params: Params, data: DataVersion, experiment: str) -> Callable[[], Extractor]:
    """The FID network, for a stage to ask for when it needs it (a reused run never does)."""
    return partial(choose_extractor, params, data, experiment)


@flow(name="train-ae")
def autoencoder_flow(
    params: Params,
    experiment: str = "latentlab",
    parent_run_id: str | None = None,
    data: DataVersion | None = None,
    fresh: bool = False,
) -> FirstStageRef:
    """The first stage for ``params.ae.factor``: reused if trained, resumed if interrupted.
    ``data``: the data version already prepared by a calling flow (else prepared here);
    ``fresh``: train anew even when a matching run exists (``reproduce``)."""
    data = data or data_flow(params, experiment)
    stage = AutoencoderStage(params, data, experiment, extractor=extractor_of(params, data, experiment))
    return first_stage(stage, parent_run_id=parent_run_id, fresh=fresh)


@flow(name="train-ldm")
def ldm_flow(
    params: Params,
    experiment: str = "latentlab",
    parent_run_id: str | None = None,
    data: DataVersion | None = None,
    fresh: bool = False,
) -> StageRun:
    """The denoiser for ``params.ae.factor``, on the reused (or newly trained) first stage.
    ``fresh``: train anew even when a matching run exists (``reproduce``)."""
    data = data or data_flow(params, experiment)
    extractor = extractor_of(params, data, experiment)
    first = first_stage(AutoencoderStage(params, data, experiment, extractor=extractor), parent_run_id=parent_run_id)
    stage = LDMStage(params, data, first, experiment, extractor=extractor)
    return run_stage(stage, parent_run_id=parent_run_id, fresh=fresh)


@flow(name="evaluate")
def evaluate_flow(
    params: Params,
    run_id: str,
    experiment: str = "latentlab",
    parent_run_id: str | None = None,
    data: DataVersion | None = None,
) -> StageRun:
    """FID, KID, precision/recall and the DDIM throughput curve of finished LDM run ``run_id``."""
    mlflow.set_experiment(experiment)
    ldm_run = run_of_stage(run_id, ("ldm",), "latentlab evaluate --run")
    if ldm_run.info.status != "FINISHED":
        raise UserError(f"LDM run {run_id} is {ldm_run.info.status}: rerun `latentlab train-ldm` to finish it first.")
    params = params_from_run(
        ldm_run.data.params, keep=params, sections=("eval", "sweep", "reproduce"), complete=() if data else ("data",)
    )
    data = data or data_flow(params, experiment)
    check_data_version(ldm_run, data)
    stage = EvaluateStage(params, data, ldm_run, experiment, extractor=extractor_of(params, data, experiment))
    return run_stage(stage, parent_run_id=parent_run_id)


def factor(params: Params, experiment: str, sweep_run_id: str, data: DataVersion, repeat: int = 0) -> FactorEntry:
    """Autoencoder -> LDM -> evaluation for one f and seed, each run recorded on the sweep run as
    it finishes. A failure is recorded, then raised: Prefect shows the factor Failed, the sweep
    goes on."""
    name = cell_name((params.ae.factor, repeat))
    entry = FactorEntry(status="running")
    try:
        with progress.factor(name):
            ldm = ldm_flow(params, experiment, sweep_run_id, data)
            entry = entry.with_run("autoencoder", ldm.tags.get(TAG_AE_RUN, "")).with_run("ldm", ldm.run_id)
            evaluation = evaluate_flow(params, ldm.run_id, experiment, sweep_run_id, data)
            entry = replace(entry.with_run("evaluate", evaluation.run_id), status=FINISHED)
    except Exception as exc:  # noqa: BLE001 (one factor must not sink the sweep)
        why = redact(f"{type(exc).__name__}: {exc}")  # (MLflow's errors carry the server's URL, credentials too)
        get_run_logger().error("%s failed: %s", name, why)
        entry = replace(entry, status=f"failed: {why}"[:500])
        write_factor_entry(sweep_run_id, params.ae.factor, entry, repeat)
        raise FactorFailed(f"{name} {entry.status}") from None
    write_factor_entry(sweep_run_id, params.ae.factor, entry, repeat)
    return entry


FACTOR_RUN_NAME = "factor-f{params.ae.factor}-seed{params.seed}"
# One factor in this process, as a task of the sweep's flow run.
run_factor = task(factor, name="factor", cache_policy=NO_CACHE, task_run_name=FACTOR_RUN_NAME)


@flow(name="factor", flow_run_name=FACTOR_RUN_NAME)
def factor_flow(params: Params, experiment: str, sweep_run_id: str, data: DataVersion, repeat: int = 0) -> FactorEntry:
    """One factor as its own flow run (the ``factor`` deployment), on any worker of the pool, in
    the project the worker was started in: it reads the sweep's data version from that
    project's ``data/`` if it holds it, else from the DVC remote (``data.remote``)."""
    with workspace.reading_data(data_version_here(params.data, data.version)):
        return factor(params, experiment, sweep_run_id, data, repeat)


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
    cells, per_cell, sweep_plan = plan(params)  # every cell's parameters valid before any work
    with progress.sweep_plan(sweep_plan):
        data = data_flow(params, experiment)
        stage = SweepStage(
            params,
            data,
            experiment,
            cells=cells,
            per_cell=per_cell,
            plan=sweep_plan,
            run_factor=run_factor,
            extractor=extractor_of(params, data, experiment),
            deployment=factor_deployment,
        )
        result = stage.outcome(run_stage(stage))
    if result.failed:
        return Failed(message=f"{', '.join(result.failed)} did not finish; rerun to retry", data=result)
    if fail_on_regression and result.regressions:
        return Failed(message="worse than the previous sweep: " + "; ".join(result.regressions), data=result)
    return result
