"""The autoencoder flow: data version -> first stage for one factor f -> MLflow run + registry.

Trained once per (data version, autoencoder parameters, training code): a rerun finds the
finished run and returns it; a run that crashed or was killed is resumed from its checkpoint
into the same MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from safetensors.torch import save_file

import components.autoencoder_training as ae_training
from components.autoencoder_training import AutoencoderModule
from components.dataset import load_split
from components.evaluation import Reference
from components.params import Params
from components.tracking import TAG_DATA_VERSION, code_hash, latest_run, register_once, stage_run, use_experiment
from flows.data import DATA_DIR, DataVersion, data_flow
from flows.extractor import TAG_FID_EXTRACTOR, choose_extractor

TAG_AE_KEY = "latentlab.ae_key"
TAG_PERCEPTUAL = "latentlab.perceptual"
STATE_DIR = Path(".latentlab")
PREVIEW_IMAGES = 8
# Settings that change how training reports, not what it learns.
REPORTING_ONLY = {"log_every", "image_every", "checkpoint_every", "accelerator"}
TRAINING_CODE = ("autoencoders.py", "losses.py", "autoencoder_training.py", "training.py")


@dataclass(frozen=True)
class AutoencoderRun:
    run_id: str  # empty for f = 1 (pixel space: nothing to train)
    factor: int
    regularizer: str
    data_version: str
    reused: bool


def autoencoder_key(params: Params, data_version: str) -> str:
    """Identity of a trained first stage: data, the parameters that shape it, and its code."""
    code = code_hash(TRAINING_CODE)
    shaping = params.ae.model_dump(mode="json", exclude=REPORTING_ONLY)
    blob = json.dumps([data_version, params.data.resolution, params.seed, shaping, code], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def model_name(params: Params) -> str:
    return f"autoencoder-f{params.ae.factor}-{params.ae.regularizer}"


@task(cache_policy=NO_CACHE)
def train(params: Params, val_images: torch.Tensor, run_id: str, checkpoint_dir: Path) -> AutoencoderModule:
    train_images, _ = load_split(Path(DATA_DIR), "train")
    return ae_training.train_autoencoder(
        params.ae,
        train_images,
        val_images[:PREVIEW_IMAGES],
        resolution=params.data.resolution,
        run_id=run_id,
        checkpoint_dir=checkpoint_dir,
        seed=params.seed,
    )


@task(cache_policy=NO_CACHE)
def evaluate(module: AutoencoderModule, val: Reference) -> dict[str, float]:
    """PSNR/SSIM and rFID of the val split's reconstructions (the paper's Table 8)."""
    metrics = ae_training.evaluate_autoencoder(module, val)
    mlflow.log_metrics(metrics, step=int(module.steps))
    mlflow.set_tag(TAG_FID_EXTRACTOR, val.extractor.tag)
    mlflow.log_image(ae_training.reconstruction_grid(module, val.images[:16]), "reconstructions_final.png")
    get_run_logger().info("Autoencoder f=%d: %s", module.stage.factor, _fmt(metrics))
    return metrics


@task(cache_policy=NO_CACHE)
def publish(module: AutoencoderModule, params: Params, run_id: str, data_version: str) -> str:
    """Weights (safetensors + diffusers directory) as artifacts, then one registry version."""
    with tempfile.TemporaryDirectory() as tmp:
        save_file(module.stage.state_dict(), Path(tmp) / "autoencoder.safetensors")
        mlflow.log_artifact(str(Path(tmp) / "autoencoder.safetensors"), "weights")
        mlflow.log_artifacts(str(ae_training.export_autoencoder(module, Path(tmp) / "diffusers")), "diffusers")
    source = f"{mlflow.get_run(run_id).info.artifact_uri}/diffusers"
    version = register_once(model_name(params), run_id, source, {TAG_DATA_VERSION: data_version})
    get_run_logger().info("Registered %s version %s", model_name(params), version)
    return version


@flow(name="train-ae")
def autoencoder_flow(
    params: Params,
    experiment: str = "latentlab",
    parent_run_id: str | None = None,
    data: DataVersion | None = None,
    fresh: bool = False,
) -> AutoencoderRun:
    """The first stage for ``params.ae.factor``: reused if trained, resumed if interrupted.
    ``data``: the data version already prepared by a calling flow (else prepared here);
    ``fresh``: train anew even when a matching run exists (``reproduce``)."""
    logger = get_run_logger()
    data = data or data_flow(params, experiment)
    ae = params.ae
    if ae.factor == 1:
        logger.info("f=1 is pixel space: no first stage to train")
        return AutoencoderRun("", 1, ae.regularizer, data.version, reused=True)
    key = autoencoder_key(params, data.version)
    experiment_id = use_experiment(experiment)
    if not fresh and (done := latest_run(experiment_id, "autoencoder", **{TAG_AE_KEY: key})):
        logger.info("Reusing finished autoencoder run %s (%s)", done.info.run_id, model_name(params))
        return AutoencoderRun(done.info.run_id, ae.factor, ae.regularizer, data.version, reused=True)
    crashed = None if fresh else latest_run(experiment_id, "autoencoder", finished=False, **{TAG_AE_KEY: key})
    if crashed:
        logger.info("Resuming interrupted autoencoder run %s", crashed.info.run_id)
    val = validation_reference(params, data.version, experiment)  # (may train the extractor: its own run)
    with stage_run(
        "autoencoder",
        data_version=data.version,
        params=params.flat("seed", "data", "ae"),
        run_name=f"ae-f{ae.factor}-{ae.regularizer}",
        factor=ae.factor,
        tags={TAG_AE_KEY: key},
        parent_run_id=parent_run_id,
        resume_run_id=crashed.info.run_id if crashed else None,
    ) as run:
        module = train(params, val.images, run.info.run_id, STATE_DIR / "checkpoints" / f"ae-{key}")
        mlflow.set_tag(TAG_PERCEPTUAL, module.perceptual.name)
        evaluate(module, val)
        publish(module, params, run.info.run_id, data.version)
    return AutoencoderRun(run.info.run_id, ae.factor, ae.regularizer, data.version, reused=False)


def validation_reference(params: Params, data_version: str, experiment: str) -> Reference:
    """The val split as the reference for rFID (reconstructions against their originals)."""
    images, _ = load_split(Path(DATA_DIR), "val")
    extractor = choose_extractor(params, data_version, experiment)
    return Reference.of(
        images,
        torch.zeros(len(images), dtype=torch.long),
        extractor,
        data_version=data_version,
        split="val",
        cache_dir=STATE_DIR / "fidelity-cache",
    )


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
