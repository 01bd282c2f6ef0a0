"""The LDM stage: a first stage (``FirstStageRef``) -> latent cache -> denoiser -> MLflow run.

Its run is named by the first stage's id, the seed, the ``ldm`` section and the code of
``components.ldm_training``; reused when finished, resumed into the same run after a crash
(``flows.stage``). The latents are encoded in the precision the autoencoder run trained in,
whatever machine trains the denoiser. The model is published as ``ldm/``
(``components.artifacts``), which is all that ``evaluate`` needs besides the dataset.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import torch
from mlflow.entities import Run

import components.ldm_training as ldm_training
from components import artifacts, progress, workspace
from components.conditioning import conditioning_for
from components.contract import (
    LDM_MODEL,
    LDM_MODELS,
    TAG_AE_RUN,
    TAG_DATA_VERSION,
    TAG_FACTOR,
    TAG_FID_EXTRACTOR,
    TAG_FIRST_STAGE,
    TAG_LATENT_SHAPE,
    TAG_REFERENCE_SPLIT,
    TAG_SEED,
    TAG_TASK,
)
from components.dataset import load_split, read_manifest
from components.diffusion import LatentDiffusionModule
from components.evaluation import budget_evaluation, reference, reference_split
from components.features import Extractor
from components.first_stage import FirstStageRef
from components.latents import cached_latents
from components.mlflow_callbacks import BudgetCurve, MLflowReporter, ShareCheckpoints
from components.params import Params
from components.precision import decide
from components.runs import precision_tags, recorded_precision, seeded_name
from components.tasks import TaskInputs, condition_channels, task_inputs
from components.tracking import log_metrics, register_once
from components.training import Budget, check_trainable
from flows.stage import DataVersion, Stage, log

GRID_IMAGES = 8  # validation images a task's sample grid shows (input, output, original)


class LDMStage(Stage):
    name, title = "ldm", "LDM"
    code = ("components.ldm_training",)
    sections = ("seed", "ldm")
    logged = ("seed", "data", "ae", "ldm", "eval")  # eval: FID during training

    def __init__(
        self,
        params: Params,
        data: DataVersion,
        first: FirstStageRef,
        experiment: str,
        *,
        extractor: Callable[[], Extractor],
    ):
        """``extractor``: gives the network FID during training is computed with (it may train one)."""
        super().__init__(params, data, experiment)
        self.first, self.extractor = first, extractor

    def upstream(self) -> list[str]:
        return [self.first.id]  # (an autoencoder run names its data version; pixel space's id does)

    def factor(self) -> int:
        return self.first.factor

    def run_name(self) -> str:
        return seeded_name(f"ldm-f{self.first.factor}", self.params.seed)

    def prepare(self, resumed: Run | None) -> None:
        """Encode the dataset once per first stage (cached), build the conditioning and the reference."""
        params = self.params
        with progress.phase("latents"):
            self.stage = artifacts.first_stage_of(self.first)
            images = {split: load_split(workspace.data_dir(), split) for split in ("train", "val")}
            splits = {split: pair[0] for split, pair in images.items()}
            bf16 = self.first.precision == "bf16-mixed"
            self.latents = cached_latents(workspace.latent_cache(self.first.id), self.stage, splits, bf16)
            self.inputs = self.task_inputs(splits["train"], bf16)
        self.grid_images = splits["val"][:GRID_IMAGES]
        self.conditioning = conditioning_for(
            params.ldm.conditioning,
            {split: pair[1] for split, pair in images.items()},
            read_manifest(workspace.data_dir())["classes"],
            context_dim=params.ldm.context_dim,
            max_text_tokens=params.ldm.max_text_tokens,
            seed=params.seed,
        )
        check_trainable(len(self.latents["train"]), params.ldm, "ldm")
        self.split = reference_split(params.eval)
        self.real = reference(self.extractor(), self.data.version, self.split, self.conditioning.cond[self.split])
        self.shape = self.stage.latent_shape(params.data.resolution)
        self.precision = (resumed and recorded_precision(resumed.data.tags)) or decide(
            params.ldm.precision, "ldm", self.shape[-1]
        )

    def task_inputs(self, images: torch.Tensor, bf16: bool) -> TaskInputs:
        """The task's inputs for the training images, drawn from the seed; inpainting's masked
        images are encoded once per first stage, masks and seed (cached like the latents)."""
        ldm, seed = self.params.ldm, self.params.seed
        cache = workspace.task_cache(self.first.id, f"{ldm.task}-{ldm.inpaint_masks}-s{seed}")
        return task_inputs(
            ldm,
            images,
            self.stage,
            seed,
            lambda holed: cached_latents(cache, self.stage, {"train": holed}, bf16)["train"],
        )

    def tags(self) -> dict[str, str]:
        autoencoder = {TAG_AE_RUN: self.first.autoencoder_run} if self.first.autoencoder_run else {}
        return {
            TAG_FIRST_STAGE: self.first.id,
            **autoencoder,
            TAG_LATENT_SHAPE: "x".join(map(str, self.shape)),
            TAG_FID_EXTRACTOR: self.real.extractor.tag,
            TAG_REFERENCE_SPLIT: self.split,
            TAG_SEED: str(self.params.seed),
            TAG_TASK: self.params.ldm.task,
            **precision_tags(self.precision),
        }

    def train(self, run_id: str, resuming: bool) -> None:
        params, conditioning = self.params, self.conditioning
        z, cond, concat = self.latents["train"], conditioning.cond["train"], self.inputs.concat
        channels, size, _ = self.shape
        torch.manual_seed(params.seed)  # the UNet's init: reproducible whatever ran before in this process
        module = LatentDiffusionModule(
            params.ldm.model_dump(mode="json"),
            channels,
            size,
            len(conditioning.classes),
            conditioning.conditioner,
            condition_channels(params.ldm, channels),
        )
        # FLOPs are linear in the batch: counting two samples costs 2/batch of the time (f=1: seconds).
        # Two, not one: GroupNorm refuses a single value per group, which one sample gives at a 1x1
        # level with a channel per group (a 2x2 latent, as f=8 on 16 px).
        few = z[:2]
        some = None if concat is None else concat[: len(few)]
        counted = ldm_training.flops_per_step(module, few, cond[: len(few)], some)
        flops = counted * params.ldm.batch_size // len(few)
        log_metrics(run_id, {"flops_per_step": flops, "unet_params": sum(p.numel() for p in module.unet.parameters())})
        checkpoints = workspace.checkpoint_dir("ldm", run_id)
        if resuming and artifacts.fetch_checkpoint(run_id, checkpoints):  # (a new run has none to fetch)
            log.info("Resuming run %s from the checkpoint it shared (trained on another machine)", run_id)
        self.module = ldm_training.train_ldm(
            module,
            params.ldm,
            z,
            cond,
            concat,
            checkpoint_dir=checkpoints,
            seed=params.seed,
            precision=self.precision.value,
            callbacks=[
                MLflowReporter(run_id, params.ldm, self.grid, "samples"),
                BudgetCurve(
                    run_id,
                    params.ldm.budget_points,
                    Budget(params.ldm.max_steps, params.ldm.max_minutes).progress,
                    budget_evaluation(module, self.stage, params, self.real),
                ),
                ShareCheckpoints(run_id, checkpoints),
            ],
        )

    def grid(self, module: LatentDiffusionModule):
        if self.params.ldm.task != "generate":
            cond = self.conditioning.cond["val"][:GRID_IMAGES]
            return ldm_training.task_grid(module, self.stage, self.params.ldm, self.grid_images, cond)
        return ldm_training.sample_grid(
            module, self.stage, self.conditioning.grid_rows, self.params.ldm.samples_per_class
        )

    def publish(self, run_id: str) -> None:
        """Final sample grid, the model (``ldm/``) and, on an autoencoder, a diffusers pipeline."""
        module, first, classes = self.module, self.first, self.conditioning.classes
        started = time.perf_counter()
        grid = self.grid(module)
        mlflow.log_metric("grid_s", time.perf_counter() - started, step=int(module.steps))
        mlflow.log_image(grid, "samples_final.png")
        mlflow.log_metric("latent_scale_factor", self.stage.scale)
        task = self.params.ldm.task
        artifacts.publish_ldm(
            module,
            factor=first.factor,
            first_stage=first.id,
            data_version=self.data.version,
            classes=classes,
            task=task,
        )
        facts = {TAG_FACTOR: str(first.factor), TAG_DATA_VERSION: self.data.version, TAG_TASK: task}
        model = None
        with tempfile.TemporaryDirectory() as tmp:
            pipeline = None
            if ldm_training.exports_pipeline(task, self.stage):  # generation; inpainting on 4 latent channels
                pipeline = ldm_training.export_pipeline(module, self.stage, classes, Path(tmp))
                artifacts.log_pipeline(
                    pipeline, resolution=self.params.data.resolution, conditioning=self.params.ldm.conditioning
                )
            if task != "generate":  # latentlab's own pyfunc runs a task model at every f
                name = LDM_MODELS[task]
                model = artifacts.publish_task_model(
                    module, first, factor=first.factor, first_stage=first.id, task=task
                )
            elif pipeline is not None:
                name, model = LDM_MODEL, artifacts.publish_pipeline(pipeline)
            else:
                log.info("f=1: pixel-space model, no diffusers pipeline to export")
        if model is not None:
            version = register_once(name, run_id, model, facts)
            log.info("Registered %s version %s (f=%d)", name, version, first.factor)
        artifacts.drop_checkpoint(run_id)  # published: nothing resumes this run any more
