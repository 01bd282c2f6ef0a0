"""The autoencoder flow: data version -> first stage for one factor f -> MLflow run + registry.

Trained once per run key (``components.runs.autoencoder_key``): a rerun finds the finished run
and returns it; a run that crashed or was killed is resumed from its checkpoint into the same
MLflow run.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

import components.autoencoder_training as ae_training
from components import artifacts, progress, workspace
from components.autoencoder_training import AutoencoderModule
from components.dataset import load_split
from components.first_stage import build_first_stage
from components.metrics import Reference
from components.mlflow_callbacks import MLflowReporter, ShareCheckpoints
from components.params import Params
from components.runs import (
    TAG_DATA_VERSION,
    TAG_FID_EXTRACTOR,
    TAG_PERCEPTUAL,
    TAG_PRECISION,
    TAG_SEED,
    ReuseOrResume,
    autoencoder_key,
    first_stage_id,
    seeded_name,
)
from components.tracking import register_once, use_experiment
from components.training import check_one_batch, resolve_precision
from flows.data import DataVersion, data_flow
from flows.extractor import reference
from flows.retries import STORE_RETRIES

PREVIEW_IMAGES = 8


@dataclass(frozen=True)
class AutoencoderRun:
    run_id: str  # "" for pixel space (f = 1: nothing to train)
    factor: int
    regularizer: str
    data_version: str
    reused: bool
    resolution: int

    @property
    def first_stage_id(self) -> str:
        """What latents made with this first stage are named and keyed by."""
        return first_stage_id(self.run_id, self.data_version, self.resolution)


def model_name(params: Params) -> str:
    return f"autoencoder-f{params.ae.factor}-{params.ae.regularizer}"


@task(cache_policy=NO_CACHE, **STORE_RETRIES)
def train(
    params: Params, train_images: torch.Tensor, preview: torch.Tensor, run_id: str, resuming: bool
) -> AutoencoderModule:
    """``resuming``: the run was interrupted, perhaps on another machine (its checkpoint is fetched then)."""

    def grid(module: AutoencoderModule):
        return ae_training.reconstruction_grid(module, preview)

    checkpoints = workspace.checkpoint_dir("ae", run_id)
    if resuming and artifacts.fetch_checkpoint(run_id, checkpoints):  # (a new run has none to fetch)
        get_run_logger().info("Resuming run %s from the checkpoint it shared (trained on another machine)", run_id)
    return ae_training.train_autoencoder(
        params.ae,
        train_images,
        resolution=params.data.resolution,
        checkpoint_dir=checkpoints,
        seed=params.seed,
        callbacks=[MLflowReporter(run_id, params.ae, grid, "reconstructions"), ShareCheckpoints(run_id, checkpoints)],
    )


@task(cache_policy=NO_CACHE, **STORE_RETRIES)
def evaluate(module: AutoencoderModule, val: Reference) -> dict[str, float]:
    """PSNR/SSIM and rFID of the val split's reconstructions (the paper's Table 8)."""
    metrics = ae_training.evaluate_autoencoder(module, val)
    mlflow.log_metrics(metrics, step=int(module.steps))
    mlflow.set_tag(TAG_FID_EXTRACTOR, val.extractor.tag)
    mlflow.log_image(ae_training.reconstruction_grid(module, val.images[:16]), "reconstructions_final.png")
    get_run_logger().info(
        "Autoencoder f=%d: %s", module.stage.factor, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    )
    return metrics


@task(cache_policy=NO_CACHE, **STORE_RETRIES)
def publish(
    module: AutoencoderModule, params: Params, train_images: torch.Tensor, run_id: str, data_version: str
) -> str:
    """The latent scale, the weights as artifacts, then one registry version."""
    scale = module.stage.fit_scale(train_images)
    mlflow.log_metric("latent_scale_factor", scale)
    source = artifacts.publish_autoencoder(module.stage, module.stage.state_dict())
    version = register_once(model_name(params), run_id, source, {TAG_DATA_VERSION: data_version})
    get_run_logger().info("Registered %s version %s", model_name(params), version)
    artifacts.drop_checkpoint(run_id)
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

    def result(run_id: str, reused: bool) -> AutoencoderRun:
        return AutoencoderRun(run_id, ae.factor, ae.regularizer, data.version, reused, params.data.resolution)

    if not build_first_stage(ae, params.data.resolution).trainable:
        logger.info("f=%d is pixel space: no first stage to train", ae.factor)
        return result("", reused=True)
    key = autoencoder_key(params, data.version)
    with ReuseOrResume.claim(use_experiment(experiment), "autoencoder", key, fresh=fresh, log=logger.info) as recorded:
        if recorded.reusable is not None:
            logger.info("Reusing finished autoencoder run %s (%s)", recorded.reusable.info.run_id, model_name(params))
            return result(recorded.reusable.info.run_id, reused=True)
        if recorded.resumable is not None:
            logger.info("Resuming interrupted autoencoder run %s", recorded.resumable.info.run_id)
        val = reference(params, data.version, experiment, "val")  # (may train the extractor: its own run)
        train_images, _ = load_split(workspace.data_dir(), "train")
        check_one_batch(len(train_images), ae, "ae")
        with recorded.start(
            data_version=data.version,
            params=params.flat("seed", "data", "ae", "eval"),  # eval: the extractor rFID uses
            run_name=seeded_name(f"ae-f{ae.factor}-{ae.regularizer}", params.seed),
            factor=ae.factor,
            tags={TAG_SEED: str(params.seed), TAG_PRECISION: resolve_precision(ae.precision, "autoencoder")},
            parent_run_id=parent_run_id,
        ) as run:
            with progress.phase("autoencoder training"):
                preview = val.images[:PREVIEW_IMAGES]
                module = train(params, train_images, preview, run.info.run_id, resuming=recorded.resumable is not None)
            mlflow.set_tag(TAG_PERCEPTUAL, module.perceptual.name)
            with progress.phase("autoencoder evaluation and export"):
                evaluate(module, val)
                publish(module, params, train_images, run.info.run_id, data.version)
        return result(run.info.run_id, reused=False)
