"""The evaluation flow: a finished LDM run -> samples -> FID, KID, precision/recall -> MLflow.

The model, its first stage and its data version all come from the LDM run; only the ``eval``
section comes from the caller. An ``evaluate`` run links back (``latentlab.ldm_run_id``) and
also carries the autoencoder's PSNR/SSIM/rFID, so comparing a sweep's evaluate runs in the
MLflow UI shows f against every headline number. Same run + same ``eval`` params + same code:
the finished evaluation is reused.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from PIL import Image
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

import components.evaluation as evaluation
import components.ldm_training as ldm_training
from components.errors import UserError
from components.evaluation import Reference, Samples, generate
from components.grids import labeled_grid
from components.params import Params, params_from_run
from components.tracking import (
    TAG_DATA_VERSION,
    TAG_FACTOR,
    code_hash,
    latest_run,
    run_of_stage,
    stage_run,
    use_experiment,
)
from flows.autoencoder import AutoencoderRun
from flows.data import DataVersion, data_flow
from flows.extractor import TAG_FID_EXTRACTOR, reference
from flows.ldm import EMA_WEIGHTS, TAG_AE_RUN, LatentData, build_module, prepare_latents

TAG_LDM_RUN = "latentlab.ldm_run_id"
TAG_EVAL_KEY = "latentlab.eval_key"
TAG_SMALL_SAMPLE = "latentlab.small_sample"
EVALUATION_CODE = ("evaluation.py", "metrics.py", "features.py")
COPIED_FROM_AE = ("psnr", "ssim", "rfid")
GRID_PER_ROW = 8


@dataclass(frozen=True)
class EvalRun:
    run_id: str
    factor: int
    ldm_run_id: str
    metrics: dict
    reused: bool


def eval_key(params: Params, ldm_run_id: str) -> str:
    code = code_hash(EVALUATION_CODE)
    blob = json.dumps([ldm_run_id, params.eval.model_dump(mode="json"), code], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def finished_ldm_run(run_id: str) -> mlflow.entities.Run:
    run = run_of_stage(run_id, ("ldm",), "latentlab evaluate --run")
    if run.info.status != "FINISHED":
        raise UserError(f"LDM run {run_id} is {run.info.status}: rerun `latentlab train-ldm` to finish it first.")
    return run


@task(cache_policy=NO_CACHE)
def load_model(run: mlflow.entities.Run, params: Params, data: LatentData):
    module = build_module(params, data)
    weights = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=f"weights/{EMA_WEIGHTS}")
    return ldm_training.load_ema_weights(module, Path(weights))


@task(cache_policy=NO_CACHE)
def score_samples(module, data: LatentData, params: Params, real: Reference) -> tuple[dict[str, float], Samples]:
    ev = params.eval
    cond = real.conditions(ev.samples, seed=params.seed)
    samples = generate(
        module,
        data.stage,
        data.scale,
        cond,
        steps=ev.sample_steps,
        sampler=ev.sampler,
        eta=ev.eta,
        guidance_scale=ev.guidance_scale,
        batch_size=ev.batch_size,
        seed=params.seed,
    )
    metrics = real.score(samples.images, full=True) | {"sample_img_per_s": samples.img_per_s}
    return metrics, samples


@task(cache_policy=NO_CACHE)
def throughput_curve(module, data: LatentData, params: Params, real: Reference) -> list[evaluation.CurvePoint]:
    ev = params.eval
    cond = real.conditions(ev.curve_samples, seed=params.seed + 1)

    def sample(steps: int) -> Samples:
        return generate(
            module,
            data.stage,
            data.scale,
            cond,
            steps=steps,
            eta=ev.eta,
            guidance_scale=ev.guidance_scale,
            batch_size=ev.batch_size,
            seed=params.seed,
        )

    return evaluation.ddim_curve(sample, real, ev.ddim_steps)


def samples_grid(samples: Samples, data: LatentData) -> Image.Image:
    """Generated images grouped by their condition (class mode), else in rows of eight."""
    pil = [Image.fromarray(i.permute(1, 2, 0).numpy()) for i in samples.images]
    cond = samples.cond.tolist()
    if data.conditioner.mode == "class":
        rows = [
            (name, [pil[i] for i, c in enumerate(cond) if c == index][:GRID_PER_ROW])
            for index, name in enumerate(data.classes)
        ]
        return labeled_grid([row for row in rows if row[1]])
    return labeled_grid([("samples", pil[i : i + GRID_PER_ROW]) for i in range(0, min(len(pil), 64), GRID_PER_ROW)])


def linked_metrics(run: mlflow.entities.Run) -> dict[str, float]:
    """The autoencoder's Table 8 numbers and the LDM's training throughput, for UI comparison."""
    metrics: dict[str, float] = {}
    ae_run_id = run.data.tags.get(TAG_AE_RUN, "")
    if ae_run_id and not ae_run_id.startswith("none"):
        ae = mlflow.get_run(ae_run_id).data.metrics
        metrics |= {k: ae[k] for k in COPIED_FROM_AE if k in ae}
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_img_per_s")
    if history:
        metrics["train_img_per_s"] = statistics.fmean(m.value for m in history)
    return metrics


@flow(name="evaluate")
def evaluate_flow(
    params: Params,
    run_id: str,
    experiment: str = "latentlab",
    parent_run_id: str | None = None,
    data: DataVersion | None = None,
) -> EvalRun:
    """FID, KID, precision/recall and the DDIM throughput curve of finished LDM run ``run_id``."""
    logger = get_run_logger()
    experiment_id = use_experiment(experiment)
    ldm_run = finished_ldm_run(run_id)
    params = params_from_run(ldm_run.data.params, keep=params, sections=("eval", "sweep", "reproduce"))
    factor = int(ldm_run.data.tags[TAG_FACTOR])
    key = eval_key(params, run_id)
    if done := latest_run(experiment_id, "evaluate", **{TAG_EVAL_KEY: key}):
        logger.info("Reusing finished evaluation %s of LDM run %s", done.info.run_id, run_id)
        return EvalRun(done.info.run_id, factor, run_id, done.data.metrics, reused=True)
    version = ldm_run.data.tags[TAG_DATA_VERSION]
    data = data or data_flow(params, experiment)
    if data.version != version:
        raise UserError(
            f"LDM run {run_id} was trained on data version {version}, but these data parameters give "
            f"{data.version}: run `latentlab reproduce {run_id}` to restore that version."
        )
    ae_tag = ldm_run.data.tags.get(TAG_AE_RUN, "")
    ae_run_id = "" if ae_tag.startswith("none") else ae_tag
    ae = AutoencoderRun(ae_run_id, factor, params.ae.regularizer, version, reused=True)
    latent = prepare_latents(params, ae)
    module = load_model(ldm_run, params, latent)
    real = reference(params, version, experiment, latent.cond)
    note = evaluation.small_sample_note(params.eval.samples)
    if note:
        logger.warning("%s.", note)
    crashed = latest_run(experiment_id, "evaluate", finished=False, **{TAG_EVAL_KEY: key})
    with stage_run(
        "evaluate",
        data_version=version,
        params=params.flat(),
        run_name=f"eval-f{factor}",
        factor=factor,
        tags={
            TAG_EVAL_KEY: key,
            TAG_LDM_RUN: run_id,
            TAG_AE_RUN: ae_tag,
            TAG_FID_EXTRACTOR: real.extractor.tag,
            TAG_SMALL_SAMPLE: str(note is not None).lower(),
            **({"latentlab.small_sample_note": note} if note else {}),
        },
        parent_run_id=parent_run_id,
        resume_run_id=crashed.info.run_id if crashed else None,
    ) as run:
        metrics, samples = score_samples(module, latent, params, real)
        metrics |= linked_metrics(ldm_run)
        mlflow.log_metrics(metrics)
        mlflow.log_image(samples_grid(samples, latent), "samples.png")
        points = throughput_curve(module, latent, params, real)
        for p in points:
            mlflow.log_metrics(
                {"ddim_fid": p.fid, "ddim_kid_mean": p.kid_mean, "ddim_sample_img_per_s": p.img_per_s}, step=p.steps
            )
        title = f"f={factor}: FID vs sampling throughput ({real.extractor.tag})"
        mlflow.log_image(evaluation.plot_curve(points, title), "fid_vs_throughput.png")
        with tempfile.TemporaryDirectory() as tmp:
            table = Path(tmp) / "ddim_curve.json"
            table.write_text(json.dumps([p.__dict__ for p in points], indent=2))
            mlflow.log_artifact(str(table))
        logger.info(
            "f=%d: FID %.4g, KID %.4g, precision %.3g, recall %.3g, %.3g samples/s (%s)",
            factor,
            metrics["fid"],
            metrics["kid_mean"],
            metrics["precision"],
            metrics["recall"],
            metrics["sample_img_per_s"],
            real.extractor.tag,
        )
    return EvalRun(run.info.run_id, factor, run_id, metrics, reused=False)
