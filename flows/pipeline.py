"""The flows that compose stages, and the registry of stages.

Each flow is a few lines: run the upstream stage, hand its run to the next (``flows.stage``).
``STAGES`` lists every stage; ``latentlab``'s commands, deployments and the sweep reach stages
through these flows only, so stages never import each other.
"""

from __future__ import annotations

import mlflow
from prefect import flow

from components.errors import UserError
from components.first_stage import FirstStageRef
from components.params import Params, params_from_run
from components.runs import run_of_stage
from flows.autoencoder import AutoencoderStage, first_stage
from flows.data import DataStage, data_flow
from flows.evaluate import EvaluateStage, check_data_version
from flows.extractor import ExtractorStage
from flows.ldm import LDMStage
from flows.stage import DataVersion, StageRun, run_stage

# Every stage: adding one is its own module, its params section and a line here.
STAGES = (DataStage, ExtractorStage, AutoencoderStage, LDMStage, EvaluateStage)


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
    return first_stage(AutoencoderStage(params, data, experiment), parent_run_id=parent_run_id, fresh=fresh)


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
    first = first_stage(AutoencoderStage(params, data, experiment), parent_run_id=parent_run_id)
    return run_stage(LDMStage(params, data, first, experiment), parent_run_id=parent_run_id, fresh=fresh)


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
    return run_stage(EvaluateStage(params, data, ldm_run, experiment), parent_run_id=parent_run_id)
