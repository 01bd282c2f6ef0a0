"""Trained models as MLflow artifacts: what the stages publish, and how a later stage, another
machine or a notebook loads them back from a run id alone.

- An autoencoder run holds ``diffusers/``, the first stage in diffusers' layout (its config
  carries the latent scale), and ``weights/autoencoder.safetensors``.
- An LDM run holds ``ldm/``: ``ldm.json`` (LDM parameters, latent shape, conditioning, the
  first stage it was trained on) beside ``ldm_ema.safetensors``; and ``pipeline/``, a
  diffusers pipeline for use outside latentlab.
- Both also log a pyfunc model (``components/pyfunc``), registered as ``autoencoder-f<f>-<reg>``
  and ``ldm`` (a version per run, alias ``f<f>`` on the version a sweep last evaluated for f and
  ``best`` on its best f), so ``mlflow.pyfunc.load_model("models:/ldm@f8")`` works anywhere.

So loading an LDM needs its run id, its first stage (named in ``ldm.json``) and, for the
conditioning table, the dataset's labels or captions; never the latents.
Downloads are kept under ``.latentlab/models/<run id>/``.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import warnings
from contextlib import suppress
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
from mlflow.models import ModelSignature, infer_signature
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from safetensors.torch import save_file

from components import pyfunc, workspace
from components.conditioning import Conditioning, conditioning_for
from components.dataset import read_manifest, records_by_split
from components.diffusion import LatentDiffusionModule, read_config
from components.errors import UserError
from components.first_stage import Autoencoder, FirstStage, FirstStageRef, load_first_stage
from components.params import LDMParams
from components.training import CHECKPOINT, LAST

FIRST_STAGE = "diffusers"
LDM = "ldm"
PIPELINE = "pipeline"


RUN_ID = re.compile(r"[0-9a-f]{32}")  # MLflow's: uuid4().hex


def local_copy(run_id: str, artifact_path: str) -> Path:
    """Run ``run_id``'s artifact, downloaded once; a partial download never looks complete.
    ``run_id`` may come from the store (an LDM's config names its first stage's run), which
    anyone with access can edit: it becomes a folder name only as a run id."""
    if not RUN_ID.fullmatch(str(run_id)):
        raise UserError(
            f"{str(run_id)[:80]!r} is not an MLflow run id (32 hex digits): the run that names it was edited "
            "or damaged; train that stage again."
        )
    target = workspace.model_dir(run_id) / artifact_path
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        try:
            fetched = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=tmp)
        except (mlflow.exceptions.MlflowException, OSError) as error:
            raise UserError(
                f"Run {run_id} has no artifact {artifact_path}/ ({error}). Runs recorded by a latentlab older "
                "than this artifact layout are not loadable: train the stage again."
            ) from None
        try:
            Path(fetched).rename(target)
        except OSError:  # another process finished the same download first
            if not target.exists():
                raise
    return target


def fetch_checkpoint(run_id: str, checkpoint_dir: Path) -> bool:
    """Run ``run_id``'s shared training checkpoint (``mlflow_callbacks.ShareCheckpoints``) into
    ``checkpoint_dir``, when this machine has none: the run was started on another machine and
    resumes here. False when there is nothing to fetch (a new run, or one already published)."""
    target = Path(checkpoint_dir) / LAST
    if target.exists():
        return False
    with tempfile.TemporaryDirectory() as scratch:
        try:
            fetched = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=f"{CHECKPOINT}/{LAST}", dst_path=scratch
            )
        except (mlflow.exceptions.MlflowException, OSError):
            return False
        workspace.write_atomically(target, lambda partial: shutil.copyfile(fetched, partial))
    return True


def drop_checkpoint(run_id: str) -> None:
    """Delete the shared checkpoint of a run whose model is published: nothing resumes it now,
    and checkpoints (optimizer state included) are the largest files a run has."""
    repository = get_artifact_repository(mlflow.get_run(run_id).info.artifact_uri)
    with suppress(Exception):  # a store that cannot delete keeps a file too many, nothing worse
        repository.delete_artifacts(CHECKPOINT)


def publish_autoencoder(stage: Autoencoder, state: dict[str, Any]) -> str:
    """Log the first stage (diffusers layout), the training module's ``state`` and a pyfunc
    model of the first stage to the active run; return the model's URI (what the registry
    points at)."""
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "autoencoder.safetensors"
        save_file(state, weights)
        mlflow.log_artifact(str(weights), "weights")
        stage.save_pretrained(Path(tmp) / FIRST_STAGE)
        mlflow.log_artifacts(str(Path(tmp) / FIRST_STAGE), FIRST_STAGE)
        return log_pyfunc(pyfunc.AUTOENCODER, {FIRST_STAGE: Path(tmp) / FIRST_STAGE}, {"output": "reconstruction"})


PYFUNC_PACKAGES = ("mlflow", "torch", "diffusers", "safetensors", "pandas")  # what loading one needs


def log_pyfunc(
    code: Path, artifacts: dict[str, Path], params: dict[str, Any], metadata: dict[str, str] | None = None
) -> str:
    """A pyfunc model (``components/pyfunc``, as code: loading it unpickles nothing) in the
    active run; returns its ``models:/`` URI. ``params``: what ``predict`` accepts, with
    defaults (pyfunc passes only declared params). Requirements are named, not inferred:
    inference loads the model in a subprocess, seconds per model. ``metadata``: facts a loader
    reads from ``model.metadata.metadata`` (an LDM's ``task``)."""
    with warnings.catch_warnings():  # ("an input example was not provided": none fits images)
        warnings.filterwarnings("ignore", message=".*input example", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name=Path(code).stem,
            python_model=str(code),
            artifacts={key: str(path) for key, path in artifacts.items()},
            signature=ModelSignature(inputs=None, params=infer_signature(params=params).params),
            pip_requirements=[f"{package}=={version(package)}" for package in PYFUNC_PACKAGES],
            metadata=metadata,
        )
    return info.model_uri


def first_stage_of(first: FirstStageRef) -> FirstStage:
    """The first stage ``first`` names: what its autoencoder run published, or pixel space."""
    run_id = first.autoencoder_run
    return FirstStage() if run_id is None else load_first_stage(local_copy(run_id, FIRST_STAGE))


def first_stage_in(config: dict[str, Any]) -> FirstStageRef:
    """The first stage an LDM's ``ldm.json`` names (``autoencoder_run_id``: its older spelling)."""
    named = config.get("first_stage") or config.get("autoencoder_run_id")
    return FirstStageRef(named, config["factor"]) if named else FirstStageRef.pixels(config.get("data_version", ""), 0)


def publish_ldm(module: LatentDiffusionModule, **facts: Any) -> None:
    """Log the LDM (``save_pretrained``, with ``facts`` in its config) to the active run."""
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.log_artifacts(str(module.save_pretrained(Path(tmp) / LDM, **facts)), LDM)


def log_pipeline(pipeline: Path, *, resolution: int, conditioning: str) -> None:
    """Log an exported diffusers pipeline as run artifacts (``pipeline/``), with the facts its
    user needs beside it."""
    # (in the folder, not as MLflow's model_config, which MLflow also logs as run params)
    facts = {"resolution": resolution, "conditioning": conditioning}
    (Path(pipeline) / pyfunc.PIPELINE_FACTS).write_text(json.dumps(facts))
    mlflow.log_artifacts(str(pipeline), PIPELINE)


def publish_pipeline(pipeline: Path) -> str:
    """Log a logged generation pipeline (``log_pipeline``) as a pyfunc model; return its URI."""
    sampling = {"steps": 50, "seed": 0, "guidance_scale": 1.0}
    return log_pyfunc(pyfunc.LDM_PIPELINE, {PIPELINE: pipeline}, sampling, {"task": "generate"})


def publish_task_model(module: LatentDiffusionModule, first: FirstStageRef, **facts: Any) -> str:
    """Log an LDM given an image (``ldm.task`` superres or inpaint) as a pyfunc model of its
    ``ldm/`` folder and first stage, ``task`` in its metadata; return the model's URI."""
    with tempfile.TemporaryDirectory() as tmp:
        model = {LDM: module.save_pretrained(Path(tmp) / LDM, **facts)}
        if first.autoencoder_run is not None:
            model[FIRST_STAGE] = local_copy(first.autoencoder_run, FIRST_STAGE)
        sampling = {"steps": module.params_.sample_steps, "seed": 0}
        return log_pyfunc(pyfunc.LDM_TASK, model, sampling, {"task": module.params_.task})


@dataclass
class TrainedLDM:
    """A recorded LDM ready to sample: the denoiser (EMA weights), its first stage, the
    dataset's conditions it was trained with, and the facts its config records."""

    module: LatentDiffusionModule
    stage: FirstStage
    conditioning: Conditioning
    config: dict[str, Any]


def load_ldm(run_id: str, data_dir: Path, seed: int = 0) -> TrainedLDM:
    """LDM run ``run_id`` from its ``ldm/`` artifact, its autoencoder run's first stage, and the
    labels or captions of the dataset in ``data_dir`` (the conditioning table's rows)."""
    directory = local_copy(run_id, LDM)
    config = read_config(directory)
    ldm = LDMParams.model_validate(config["ldm"])
    conditioning = conditioning_for(
        config["conditioning"],
        records_by_split(data_dir),
        read_manifest(data_dir)["classes"],
        context_dim=ldm.context_dim,
        max_text_tokens=ldm.max_text_tokens,
        seed=seed,
    )
    module = LatentDiffusionModule.from_pretrained(directory, conditioning.conditioner)
    return TrainedLDM(module, first_stage_of(first_stage_in(config)), conditioning, config)
