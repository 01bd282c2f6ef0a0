"""The evaluate stage: a finished LDM run -> samples -> FID, KID, precision/recall -> MLflow.

The model, its first stage and its data version all come from the LDM run; only the ``eval``
section comes from the caller. An ``evaluate`` run links back (``latentlab.ldm_run_id``) and
also carries the autoencoder's PSNR/SSIM/rFID, so comparing a sweep's evaluate runs in the
MLflow UI shows f against every headline number. Same run + same ``eval`` params + same code:
the finished evaluation is reused (``flows.stage``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import mlflow
from mlflow.entities import Run

import components.evaluation as evaluation
from components import artifacts, workspace
from components.contract import (
    TAG_AE_RUN,
    TAG_FACTOR,
    TAG_FID_EXTRACTOR,
    TAG_FIRST_STAGE,
    TAG_LDM_RUN,
    TAG_REFERENCE_SPLIT,
    TAG_SMALL_SAMPLE,
    TAG_SMALL_SAMPLE_NOTE,
    TAG_TASK,
)
from components.errors import UserError
from components.features import Extractor
from components.fid_inf import fid_infinity
from components.grids import labeled_grid
from components.images import to_pil
from components.metrics import bootstrap_intervals
from components.params import Params
from components.runs import autoencoder_run_of, seeded_name
from flows.stage import DataVersion, Stage, log

COPIED_FROM_AE = ("psnr", "ssim", "rfid")


class EvaluateStage(Stage):
    name, title = "evaluate", "evaluation"
    code = ("components.evaluation",)
    sections = ("eval",)  # (the seed and everything else come from the LDM run)

    def __init__(
        self, params: Params, data: DataVersion, ldm_run: Run, experiment: str, *, extractor: Callable[[], Extractor]
    ):
        """``extractor``: gives the network the samples are scored with (it may train one)."""
        super().__init__(params, data, experiment)
        self.ldm_run, self.extractor = ldm_run, extractor

    def upstream(self) -> list[str]:
        return [self.ldm_run.info.run_id]

    def factor(self) -> int:
        return int(self.ldm_run.data.tags[TAG_FACTOR])

    def run_name(self) -> str:
        return seeded_name(f"eval-f{self.factor()}", self.params.seed)

    def logged_params(self) -> dict[str, Any]:
        return self.params.flat()

    def prepare(self, resumed: Run | None) -> None:
        run_id = self.ldm_run.info.run_id
        self.model = artifacts.load_ldm(run_id, workspace.data_dir(), seed=self.params.seed)
        self.split = evaluation.reference_split(self.params.eval)
        self.real = evaluation.reference(
            self.extractor(), self.data.version, self.split, self.model.conditioning.cond[self.split]
        )
        self.note = evaluation.small_sample_note(self.params.eval.samples)
        if self.note:
            log.warning("%s.", self.note)

    def tags(self) -> dict[str, str]:
        ldm_tags = self.ldm_run.data.tags
        linked = {tag: ldm_tags[tag] for tag in (TAG_AE_RUN, TAG_FIRST_STAGE, TAG_TASK) if tag in ldm_tags}
        return {
            TAG_LDM_RUN: self.ldm_run.info.run_id,
            **linked,
            TAG_FID_EXTRACTOR: self.real.extractor.tag,
            TAG_REFERENCE_SPLIT: self.split,
            TAG_SMALL_SAMPLE: str(self.note is not None).lower(),
            **({TAG_SMALL_SAMPLE_NOTE: self.note} if self.note else {}),
        }

    def train(self, run_id: str, resuming: bool) -> None:
        """Headline metrics with intervals, then the DDIM curve (Figure 7)."""
        ev, seed, model, real = self.params.eval, self.params.seed, self.model, self.real
        drawn = evaluation.draw(real, ev.samples, seed, model.module, model.stage)
        self.samples = evaluation.sample_as_told(
            model.module, model.stage, drawn, ev, seed, ev.sample_steps, ev.sampler
        )
        scored = real.score(self.samples.images, full=True)
        real_features, fake_features = real.features(self.samples.images)  # once, for both resamplings
        if ev.bootstrap_rounds:
            scored |= bootstrap_intervals(
                real_features, fake_features, rounds=ev.bootstrap_rounds, confidence=ev.confidence, seed=seed
            )
        scored |= fid_infinity(real_features, fake_features, confidence=ev.confidence, seed=seed)
        scored |= evaluation.task_scores(
            model.module.params_,
            drawn.originals,
            self.samples.images,
            drawn.inputs,
            confidence=ev.confidence,
            seed=seed,
        )
        self.large = None
        if model.module.params_.task == "generate" and ev.large_samples:
            at_2x, self.large = evaluation.kid_at_larger_size(model.module, model.stage, real, ev, seed)
            scored |= at_2x
        counts = {
            "samples": len(self.samples.images),
            "reference_images": len(real.images),
        }  # (the report's provenance)
        self.metrics = scored | counts | {"sample_img_per_s": self.samples.img_per_s} | linked_metrics(self.ldm_run)
        curve_drawn = evaluation.draw(real, ev.curve_samples, seed + 1, model.module, model.stage)
        self.points = evaluation.ddim_curve(
            lambda steps: evaluation.sample_as_told(model.module, model.stage, curve_drawn, ev, seed, steps),
            real,
            ev.ddim_steps,
        )

    def publish(self, run_id: str) -> None:
        metrics, points, factor, extractor = self.metrics, self.points, self.factor(), self.real.extractor.tag
        mlflow.log_metrics(metrics)
        classes = self.model.conditioning.classes if self.model.conditioning.conditioner.mode == "class" else None
        mlflow.log_image(evaluation.samples_grid(self.samples, classes), "samples.png")
        if self.large is not None:
            mlflow.log_image(labeled_grid([("2x size", to_pil(self.large[:8]))]), "samples_2x.png")
        for p in points:
            mlflow.log_metrics(
                {"ddim_fid": p.fid, "ddim_kid_mean": p.kid_mean, "ddim_sample_img_per_s": p.img_per_s}, step=p.steps
            )
        title = f"f={factor}: KID vs sampling throughput ({extractor})"
        mlflow.log_image(evaluation.plot_curve(points, title), "kid_vs_throughput.png")
        mlflow.log_dict([p.__dict__ for p in points], "ddim_curve.json")
        log.info(
            "f=%d: FID %.4g [%.4g, %.4g], KID %.4g, precision %.3g, recall %.3g, %.3g samples/s (%s)",
            factor,
            metrics["fid"],
            metrics.get("fid_ci_low", float("nan")),
            metrics.get("fid_ci_high", float("nan")),
            metrics["kid_mean"],
            metrics["precision"],
            metrics["recall"],
            metrics["sample_img_per_s"],
            extractor,
        )


def linked_metrics(run: Run) -> dict[str, float]:
    """The autoencoder's Table 8 numbers and the LDM's training throughput, for UI comparison."""
    metrics: dict[str, float] = {}
    if ae_run_id := autoencoder_run_of(run):
        ae = mlflow.get_run(ae_run_id).data.metrics
        metrics |= {k: ae[k] for k in COPIED_FROM_AE if k in ae}
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_img_per_s")
    if history:
        metrics["train_img_per_s"] = statistics.fmean(m.value for m in history)
    return metrics


def check_data_version(ldm_run: Run, data: DataVersion) -> None:
    """The data these parameters give must be the data the LDM trained on."""
    version = ldm_run.data.tags["latentlab.data_version"]
    if data.version != version:
        raise UserError(
            f"LDM run {ldm_run.info.run_id} was trained on data version {version}, but these data parameters give "
            f"{data.version}: run `latentlab reproduce {ldm_run.info.run_id}` to restore that version."
        )
