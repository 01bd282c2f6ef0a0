"""The autoencoder stage: data version -> first stage for one factor f -> MLflow run + registry.

Its run is named by the data version, the seed, the resolution, the ``ae`` section and the code
of ``components.autoencoder_training``; a rerun reuses the finished run, a run that crashed or
was killed resumes from its checkpoint into the same MLflow run (``flows.stage``). Pixel space
(f = 1) has no stage run: ``first_stage`` names it instead.
"""

from __future__ import annotations

from collections.abc import Callable

import mlflow
from mlflow.entities import Run

import components.autoencoder_training as ae_training
from components import artifacts, workspace
from components.autoencoder_training import AutoencoderModule
from components.contract import TAG_DATA_VERSION, TAG_FID_EXTRACTOR, TAG_PERCEPTUAL, TAG_SEED
from components.dataset import load_split
from components.evaluation import reference
from components.features import Extractor
from components.first_stage import FirstStageRef, pixel_space
from components.mlflow_callbacks import MLflowReporter, ShareCheckpoints
from components.params import Params
from components.precision import decide
from components.runs import precision_tags, recorded_precision, seeded_name
from components.tracking import register_once
from components.training import check_trainable
from flows.stage import DataVersion, Stage, StageRun, log, run_stage

PREVIEW_IMAGES = 8


class AutoencoderStage(Stage):
    name = title = "autoencoder"
    code = ("components.autoencoder_training",)
    sections = ("seed", "data.resolution", "ae")
    logged = ("seed", "data", "ae", "eval")  # eval: the extractor rFID uses

    def __init__(self, params: Params, data: DataVersion, experiment: str, *, extractor: Callable[[], Extractor]):
        """``extractor``: gives the network rFID is computed with (it may train one)."""
        super().__init__(params, data, experiment)
        self.extractor = extractor

    def factor(self) -> int:
        return self.params.ae.factor

    def model_name(self) -> str:
        return f"autoencoder-f{self.params.ae.factor}-{self.params.ae.regularizer}"

    def run_name(self) -> str:
        return seeded_name(f"ae-f{self.params.ae.factor}-{self.params.ae.regularizer}", self.params.seed)

    def prepare(self, resumed: Run | None) -> None:
        self.val = reference(self.extractor(), self.data.version, "val")
        self.images, _ = load_split(workspace.data_dir(), "train")
        check_trainable(len(self.images), self.params.ae, "ae")
        self.precision = (resumed and recorded_precision(resumed.data.tags)) or decide(
            self.params.ae.precision, "autoencoder"
        )

    def tags(self) -> dict[str, str]:
        return {TAG_SEED: str(self.params.seed), **precision_tags(self.precision)}

    def train(self, run_id: str, resuming: bool) -> None:
        checkpoints = workspace.checkpoint_dir("ae", run_id)
        if resuming and artifacts.fetch_checkpoint(run_id, checkpoints):  # (a new run has none to fetch)
            log.info("Resuming run %s from the checkpoint it shared (trained on another machine)", run_id)
        preview = self.val.images[:PREVIEW_IMAGES]
        self.module: AutoencoderModule = ae_training.train_autoencoder(
            self.params.ae,
            self.images,
            resolution=self.params.data.resolution,
            checkpoint_dir=checkpoints,
            seed=self.params.seed,
            precision=self.precision.value,
            callbacks=[
                MLflowReporter(
                    run_id, self.params.ae, lambda m: ae_training.reconstruction_grid(m, preview), "reconstructions"
                ),
                ShareCheckpoints(run_id, checkpoints),
            ],
        )
        mlflow.set_tag(TAG_PERCEPTUAL, self.module.perceptual.name)

    def publish(self, run_id: str) -> None:
        """PSNR/SSIM and rFID of val's reconstructions (the paper's Table 8), the latent scale,
        the weights as artifacts, then one registry version."""
        module = self.module
        metrics = ae_training.evaluate_autoencoder(module, self.val)
        mlflow.log_metrics(metrics, step=int(module.steps))
        mlflow.set_tag(TAG_FID_EXTRACTOR, self.val.extractor.tag)
        mlflow.log_image(ae_training.reconstruction_grid(module, self.val.images[:16]), "reconstructions_final.png")
        log.info("Autoencoder f=%d: %s", self.factor(), ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        mlflow.log_metric("latent_scale_factor", module.stage.fit_scale(self.images))
        source = artifacts.publish_autoencoder(module.stage, module.stage.state_dict())
        version = register_once(self.model_name(), run_id, source, {TAG_DATA_VERSION: self.data.version})
        log.info("Registered %s version %s", self.model_name(), version)
        artifacts.drop_checkpoint(run_id)


def first_stage(stage: AutoencoderStage, *, parent_run_id: str | None = None, fresh: bool = False) -> FirstStageRef:
    """The first stage for ``stage``'s factor: pixel space, or its autoencoder run (reused if
    trained, resumed if interrupted, else trained)."""
    ae = stage.params.ae
    if pixel_space(ae.factor):
        log.info("f=%d is pixel space: no first stage to train", ae.factor)
        return FirstStageRef.pixels(stage.data.version, stage.params.data.resolution)
    run: StageRun = run_stage(stage, parent_run_id=parent_run_id, fresh=fresh)
    return FirstStageRef(run.run_id, ae.factor, recorded_precision(run.tags).value, run.reused)


__all__ = ["AutoencoderStage", "DataVersion", "first_stage"]
