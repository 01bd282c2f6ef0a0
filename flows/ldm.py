"""The latent diffusion flow: autoencoder (reused) -> latent cache -> denoiser -> MLflow run.

Like the autoencoder flow: trained once per run key (``components.runs.ldm_key``), resumed into
the same run after a crash. The model is published as ``ldm/`` (``components.artifacts``), which
is all that ``evaluate`` needs besides the dataset.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

import components.ldm_training as ldm_training
from components import artifacts, progress, workspace
from components.conditioning import Conditioning, conditioning_for
from components.dataset import load_split, read_manifest
from components.diffusion import LatentDiffusionModule
from components.evaluation import generate
from components.first_stage import FirstStage
from components.latents import cached_latents
from components.metrics import Reference
from components.mlflow_callbacks import MLflowReporter, PeriodicEvaluation, ShareCheckpoints
from components.params import Params
from components.runs import (
    NO_AUTOENCODER,
    TAG_AE_RUN,
    TAG_DATA_VERSION,
    TAG_FACTOR,
    TAG_FID_EXTRACTOR,
    TAG_LATENT_SHAPE,
    TAG_PRECISION,
    TAG_REFERENCE_SPLIT,
    TAG_SEED,
    ReuseOrResume,
    ldm_key,
    seeded_name,
)
from components.tracking import log_metrics, register_once, use_experiment
from components.training import check_one_batch, resolve_precision
from flows.autoencoder import AutoencoderRun, autoencoder_flow
from flows.data import DataVersion
from flows.extractor import reference, reference_split
from flows.retries import STORE_RETRIES


@dataclass(frozen=True)
class LDMRun:
    run_id: str
    factor: int
    ae_run_id: str
    data_version: str
    reused: bool


@dataclass
class LatentData:
    """What the denoiser trains on: the first stage, its latents per split, the conditions."""

    stage: FirstStage
    latents: dict[str, torch.Tensor]
    conditioning: Conditioning


@task(cache_policy=NO_CACHE)
def prepare_latents(params: Params, ae: AutoencoderRun) -> LatentData:
    """Encode the dataset once per first stage (cached), and build the conditioning."""
    stage = artifacts.first_stage_of(ae.run_id)
    images = {split: load_split(workspace.data_dir(), split) for split in ("train", "val")}
    bf16 = resolve_precision(params.ae.precision, "autoencoder") == "bf16-mixed"
    splits = {split: pair[0] for split, pair in images.items()}
    latents = cached_latents(workspace.latent_cache(ae.first_stage_id), stage, splits, bf16)
    conditioning = conditioning_for(
        params.ldm.conditioning,
        {split: pair[1] for split, pair in images.items()},
        read_manifest(workspace.data_dir())["classes"],
        context_dim=params.ldm.context_dim,
        max_text_tokens=params.ldm.max_text_tokens,
        seed=params.seed,
    )
    return LatentData(stage, latents, conditioning)


def fid_during_training(
    module: LatentDiffusionModule, stage: FirstStage, params: Params, real: Reference
) -> Callable[[], dict[str, float]]:
    """FID/KID of ``ldm.fid_samples`` fresh samples against the reference (Figure 6's axis)."""
    ldm = params.ldm

    def evaluate() -> dict[str, float]:
        samples = generate(
            module,
            stage,
            real.conditions(ldm.fid_samples, seed=params.seed),
            steps=ldm.fid_sample_steps,
            guidance_scale=params.eval.guidance_scale,
            batch_size=params.eval.batch_size,
            seed=params.seed,
        )
        metrics = real.score(samples.images, full=False)
        return {"fid": metrics["fid"], "kid_mean": metrics["kid_mean"]}

    return evaluate


@task(cache_policy=NO_CACHE, **STORE_RETRIES)
def train(params: Params, data: LatentData, run_id: str, real: Reference, resuming: bool) -> LatentDiffusionModule:
    """``resuming``: the run was interrupted, perhaps on another machine (its checkpoint is fetched then)."""
    z, cond, conditioning = data.latents["train"], data.conditioning.cond["train"], data.conditioning
    channels, size, _ = data.stage.latent_shape(params.data.resolution)
    torch.manual_seed(params.seed)  # the UNet's init: reproducible whatever ran before in this process
    module = LatentDiffusionModule(
        params.ldm.model_dump(mode="json"), channels, size, len(conditioning.classes), conditioning.conditioner
    )
    batch = params.ldm.batch_size
    # FLOPs are linear in the batch: counting one sample costs 1/batch of the time (f=1: seconds)
    flops = ldm_training.flops_per_step(module, z[:1], cond[:1]) * batch
    log_metrics(run_id, {"flops_per_step": flops, "unet_params": sum(p.numel() for p in module.unet.parameters())})

    def grid(module: LatentDiffusionModule):
        return ldm_training.sample_grid(module, data.stage, conditioning.grid_rows, params.ldm.samples_per_class)

    checkpoints = workspace.checkpoint_dir("ldm", run_id)
    if resuming and artifacts.fetch_checkpoint(run_id, checkpoints):  # (a new run has none to fetch)
        get_run_logger().info("Resuming run %s from the checkpoint it shared (trained on another machine)", run_id)
    return ldm_training.train_ldm(
        module,
        params.ldm,
        z,
        cond,
        checkpoint_dir=checkpoints,
        seed=params.seed,
        callbacks=[
            MLflowReporter(run_id, params.ldm, grid, "samples"),
            PeriodicEvaluation(run_id, params.ldm.fid_every, fid_during_training(module, data.stage, params, real)),
            ShareCheckpoints(run_id, checkpoints),
        ],
    )


@task(cache_policy=NO_CACHE, **STORE_RETRIES)
def publish(module: LatentDiffusionModule, data: LatentData, params: Params, ae: AutoencoderRun) -> None:
    """Final sample grid, the model (``ldm/``) and, on an autoencoder, a diffusers pipeline."""
    rows, classes = data.conditioning.grid_rows, data.conditioning.classes
    started = time.perf_counter()
    grid = ldm_training.sample_grid(module, data.stage, rows, params.ldm.samples_per_class)
    mlflow.log_metric("grid_s", time.perf_counter() - started, step=int(module.steps))
    mlflow.log_image(grid, "samples_final.png")
    mlflow.log_metric("latent_scale_factor", data.stage.scale)
    artifacts.publish_ldm(
        module, factor=ae.factor, autoencoder_run_id=ae.run_id, data_version=ae.data_version, classes=classes
    )
    run_id = mlflow.active_run().info.run_id
    if data.stage.trainable:
        with tempfile.TemporaryDirectory() as tmp:
            model = artifacts.publish_pipeline(
                ldm_training.export_pipeline(module, data.stage, classes, Path(tmp)),
                resolution=params.data.resolution,
                conditioning=params.ldm.conditioning,
            )
        facts = {TAG_FACTOR: str(ae.factor), TAG_DATA_VERSION: ae.data_version}
        version = register_once(artifacts.LDM_MODEL, run_id, model, facts)
        get_run_logger().info("Registered %s version %s (f=%d)", artifacts.LDM_MODEL, version, ae.factor)
    else:
        get_run_logger().info("f=1: pixel-space model, no diffusers pipeline to export")
    artifacts.drop_checkpoint(run_id)  # published: nothing resumes this run any more


@flow(name="train-ldm")
def ldm_flow(
    params: Params,
    experiment: str = "latentlab",
    parent_run_id: str | None = None,
    data: DataVersion | None = None,
    fresh: bool = False,
) -> LDMRun:
    """The denoiser for ``params.ae.factor``, on the reused (or newly trained) first stage.
    ``fresh``: train anew even when a matching run exists (``reproduce``)."""
    logger = get_run_logger()
    ae = autoencoder_flow(params, experiment, parent_run_id, data)
    key = ldm_key(params, ae.first_stage_id)
    with ReuseOrResume.claim(use_experiment(experiment), "ldm", key, fresh=fresh, log=logger.info) as recorded:
        if recorded.reusable is not None:
            logger.info("Reusing finished LDM run %s", recorded.reusable.info.run_id)
            return LDMRun(recorded.reusable.info.run_id, ae.factor, ae.run_id, ae.data_version, reused=True)
        with progress.phase("latents"):
            latent = prepare_latents(params, ae)
        check_one_batch(len(latent.latents["train"]), params.ldm, "ldm")
        split = reference_split(params)
        real = reference(params, ae.data_version, experiment, split, latent.conditioning.cond[split])
        shape = latent.stage.latent_shape(params.data.resolution)
        with recorded.start(
            data_version=ae.data_version,
            params=params.flat("seed", "data", "ae", "ldm", "eval"),  # eval: FID during training
            run_name=seeded_name(f"ldm-f{ae.factor}", params.seed),
            factor=ae.factor,
            tags={
                TAG_AE_RUN: ae.run_id or NO_AUTOENCODER,
                TAG_LATENT_SHAPE: "x".join(map(str, shape)),
                TAG_FID_EXTRACTOR: real.extractor.tag,
                TAG_REFERENCE_SPLIT: split,
                TAG_SEED: str(params.seed),
                TAG_PRECISION: resolve_precision(params.ldm.precision, "ldm", shape[-1]),
            },
            parent_run_id=parent_run_id,
        ) as run:
            with progress.phase("LDM training"):
                module = train(params, latent, run.info.run_id, real, resuming=recorded.resumable is not None)
            with progress.phase("LDM samples and export"):
                publish(module, latent, params, ae)
        return LDMRun(run.info.run_id, ae.factor, ae.run_id, ae.data_version, reused=False)
