"""The latent diffusion flow: autoencoder (reused) -> latent cache -> denoiser -> MLflow run.

Like the autoencoder flow: trained once per (autoencoder run, LDM parameters, code), resumed
into the same run after a crash.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

import components.ldm_training as ldm_training
from components.autoencoders import FirstStage, build_first_stage, load_first_stage
from components.conditioning import Conditioner, TextEncoder
from components.dataset import load_split, read_manifest
from components.diffusion import LatentDiffusionModule
from components.evaluation import Reference, generate
from components.latents import cached_latents
from components.params import Params
from components.tracking import code_hash, latest_run, stage_run, use_experiment
from flows.autoencoder import REPORTING_ONLY, STATE_DIR, AutoencoderRun, autoencoder_flow
from flows.data import DATA_DIR, DataVersion
from flows.extractor import TAG_FID_EXTRACTOR, reference

TAG_AE_RUN = "latentlab.ae_run_id"
TAG_LDM_KEY = "latentlab.ldm_key"
TAG_LATENT_SHAPE = "latentlab.latent_shape"
EMA_WEIGHTS = "ldm_ema.safetensors"
# Settings that change how training reports, not what it learns.
LDM_REPORTING_ONLY = REPORTING_ONLY | {"fid_every", "fid_samples", "fid_sample_steps", "samples_per_class"}
TRAINING_CODE = ("diffusion.py", "conditioning.py", "ldm_training.py", "latents.py", "training.py")
GRID_ROWS = 12


@dataclass(frozen=True)
class LDMRun:
    run_id: str
    factor: int
    ae_run_id: str
    data_version: str
    reused: bool


@dataclass
class LatentData:
    stage: FirstStage
    scale: float
    latents: dict[str, torch.Tensor]
    cond: dict[str, torch.Tensor]
    conditioner: Conditioner
    grid_rows: list[tuple[str, int]]
    classes: list[str]


def ldm_key(params: Params, ae: AutoencoderRun) -> str:
    code = code_hash(TRAINING_CODE)
    shaping = params.ldm.model_dump(mode="json", exclude=LDM_REPORTING_ONLY)
    identity = ae.run_id or f"pixels-{ae.data_version}-{params.data.resolution}"
    blob = json.dumps([identity, params.seed, shaping, code], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def first_stage(ae: AutoencoderRun) -> FirstStage:
    if not ae.run_id:
        return build_first_stage(1)
    local = STATE_DIR / "models" / ae.run_id
    if not (local / "diffusers").exists():
        mlflow.artifacts.download_artifacts(run_id=ae.run_id, artifact_path="diffusers", dst_path=str(local))
    return load_first_stage(local / "diffusers", ae.factor, ae.regularizer)


@task(cache_policy=NO_CACHE)
def prepare_latents(params: Params, ae: AutoencoderRun) -> LatentData:
    """Encode the dataset once per first stage (cached), and build the conditioning."""
    stage = first_stage(ae)
    images = {split: load_split(Path(DATA_DIR), split) for split in ("train", "val")}
    cache = STATE_DIR / "latents" / f"{ae.run_id or 'pixels-' + ae.data_version}.safetensors"
    latents, scale = cached_latents(cache, stage, {s: pair[0] for s, pair in images.items()})
    classes = read_manifest(Path(DATA_DIR))["classes"]
    records = {s: pair[1] for s, pair in images.items()}
    mode = params.ldm.conditioning
    if mode == "text":
        ordered = records["train"] + records["val"]
        states = TextEncoder(params.ldm.max_text_tokens)([r.caption for r in ordered] + [""])
        conditioner = Conditioner("text", len(classes), states.shape[-1], states)
        n_train = len(records["train"])
        cond = {"train": torch.arange(n_train), "val": torch.arange(n_train, len(ordered))}
        seen: dict[str, int] = {}
        for i, r in enumerate(records["val"]):
            seen.setdefault(r.label, n_train + i)
        grid_rows = [(ordered[i].caption, i) for i in list(seen.values())[:GRID_ROWS]]
    else:
        index = {c: i for i, c in enumerate(classes)}
        torch.manual_seed(params.seed)  # the class table's init: reproducible whatever ran before
        conditioner = Conditioner(mode, len(classes), params.ldm.context_dim)
        cond = {s: torch.tensor([index[r.label] for r in rs]) for s, rs in records.items()}
        grid_rows = list(zip(classes, range(len(classes)), strict=True)) if mode == "class" else [("samples", 0)]
    return LatentData(stage, scale, latents, cond, conditioner, grid_rows[:GRID_ROWS], classes)


def build_module(params: Params, data: LatentData) -> LatentDiffusionModule:
    z = data.latents["train"]
    return LatentDiffusionModule(
        params.ldm.model_dump(mode="json"), z.shape[1], z.shape[-1], len(data.classes), data.conditioner
    )


def fid_during_training(
    module: LatentDiffusionModule, data: LatentData, params: Params, reference: Reference
) -> Callable[[], dict[str, float]]:
    """FID/KID of ``ldm.fid_samples`` fresh samples against the reference (Figure 6's axis)."""
    ldm = params.ldm

    def evaluate() -> dict[str, float]:
        cond = reference.conditions(ldm.fid_samples, seed=params.seed)
        samples = generate(
            module,
            data.stage,
            data.scale,
            cond,
            steps=ldm.fid_sample_steps,
            guidance_scale=params.eval.guidance_scale,
            batch_size=params.eval.batch_size,
            seed=params.seed,
        )
        metrics = reference.score(samples.images, full=False)
        return {"fid": metrics["fid"], "kid_mean": metrics["kid_mean"]}

    return evaluate


@task(cache_policy=NO_CACHE)
def train(
    params: Params, data: LatentData, run_id: str, checkpoint_dir: Path, reference: Reference
) -> LatentDiffusionModule:
    z = data.latents["train"]
    torch.manual_seed(params.seed)  # the UNet's init: reproducible whatever ran before in this process
    module = build_module(params, data)
    flops = ldm_training.flops_per_step(module, z[: params.ldm.batch_size], data.cond["train"][: params.ldm.batch_size])
    mlflow.log_metric("flops_per_step", flops)
    mlflow.log_metric("unet_params", sum(p.numel() for p in module.unet.parameters()))

    def grid():
        return ldm_training.sample_grid(module, data.stage, data.scale, data.grid_rows, params.ldm.samples_per_class)

    return ldm_training.train_ldm(
        module,
        params.ldm,
        z,
        data.cond["train"],
        run_id=run_id,
        checkpoint_dir=checkpoint_dir,
        seed=params.seed,
        grid=grid,
        evaluate=fid_during_training(module, data, params, reference),
    )


@task(cache_policy=NO_CACHE)
def publish(module: LatentDiffusionModule, data: LatentData, params: Params) -> None:
    """Final sample grid, EMA weights (safetensors) and the diffusers pipeline directory."""
    grid = ldm_training.sample_grid(module, data.stage, data.scale, data.grid_rows, params.ldm.samples_per_class)
    mlflow.log_image(grid, "samples_final.png")
    mlflow.log_metric("latent_scale_factor", data.scale)
    with tempfile.TemporaryDirectory() as tmp:
        ldm_training.save_ema_weights(module, Path(tmp) / EMA_WEIGHTS)
        mlflow.log_artifact(str(Path(tmp) / EMA_WEIGHTS), "weights")
        pipeline = ldm_training.export_pipeline(module, data.stage, data.scale, data.classes, Path(tmp) / "pipeline")
        if pipeline is None:
            get_run_logger().info("f=1: pixel-space model, no diffusers pipeline to export")
        else:
            mlflow.log_artifacts(str(pipeline), "pipeline")


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
    key = ldm_key(params, ae)
    experiment_id = use_experiment(experiment)
    if not fresh and (done := latest_run(experiment_id, "ldm", **{TAG_LDM_KEY: key})):
        logger.info("Reusing finished LDM run %s", done.info.run_id)
        return LDMRun(done.info.run_id, ae.factor, ae.run_id, ae.data_version, reused=True)
    crashed = None if fresh else latest_run(experiment_id, "ldm", finished=False, **{TAG_LDM_KEY: key})
    data = prepare_latents(params, ae)
    real = reference(params, ae.data_version, experiment, data.cond)
    with stage_run(
        "ldm",
        data_version=ae.data_version,
        params=params.flat("seed", "data", "ae", "ldm"),
        run_name=f"ldm-f{ae.factor}",
        factor=ae.factor,
        tags={
            TAG_LDM_KEY: key,
            TAG_AE_RUN: ae.run_id or "none (pixel space)",
            TAG_LATENT_SHAPE: "x".join(map(str, data.latents["train"].shape[1:])),
            TAG_FID_EXTRACTOR: real.extractor.tag,
        },
        parent_run_id=parent_run_id,
        resume_run_id=crashed.info.run_id if crashed else None,
    ) as run:
        module = train(params, data, run.info.run_id, STATE_DIR / "checkpoints" / f"ldm-{key}", real)
        publish(module, data, params)
    return LDMRun(run.info.run_id, ae.factor, ae.run_id, ae.data_version, reused=False)
