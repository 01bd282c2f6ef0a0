"""The evaluation flow: a finished LDM run -> samples -> FID, KID, precision/recall -> MLflow.

The model, its first stage and its data version all come from the LDM run; only the ``eval``
section comes from the caller. An ``evaluate`` run links back (``latentlab.ldm_run_id``) and
also carries the autoencoder's PSNR/SSIM/rFID, so comparing a sweep's evaluate runs in the
MLflow UI shows f against every headline number. Same run + same ``eval`` params + same code:
the finished evaluation is reused.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import mlflow
from PIL import Image
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

import components.evaluation as evaluation
from components import artifacts, progress, workspace
from components.artifacts import TrainedLDM
from components.errors import UserError
from components.evaluation import Samples, generate
from components.grids import labeled_grid
from components.images import to_pil
from components.metrics import Reference
from components.params import Params, params_from_run
from components.runs import (
    TAG_AE_RUN,
    TAG_DATA_VERSION,
    TAG_FACTOR,
    TAG_FID_EXTRACTOR,
    TAG_LDM_RUN,
    TAG_REFERENCE_SPLIT,
    TAG_SMALL_SAMPLE,
    TAG_SMALL_SAMPLE_NOTE,
    ReuseOrResume,
    autoencoder_run_of,
    evaluation_key,
    run_of_stage,
    seeded_name,
)
from components.tracking import use_experiment
from flows.data import DataVersion, data_flow
from flows.extractor import reference, reference_split

COPIED_FROM_AE = ("psnr", "ssim", "rfid")
GRID_PER_ROW = 8


@dataclass(frozen=True)
class EvalRun:
    run_id: str
    factor: int
    ldm_run_id: str
    metrics: dict
    reused: bool


def finished_ldm_run(run_id: str) -> mlflow.entities.Run:
    run = run_of_stage(run_id, ("ldm",), "latentlab evaluate --run")
    if run.info.status != "FINISHED":
        raise UserError(f"LDM run {run_id} is {run.info.status}: rerun `latentlab train-ldm` to finish it first.")
    return run


def sample(model: TrainedLDM, cond, params: Params, steps: int, sampler: str = "ddim") -> Samples:
    """Images of ``model`` for the condition indices ``cond``, as ``eval`` says."""
    ev = params.eval
    return generate(
        model.module,
        model.stage,
        cond,
        steps=steps,
        sampler=sampler,
        eta=ev.eta,
        guidance_scale=ev.guidance_scale,
        batch_size=ev.batch_size,
        seed=params.seed,
    )


@task(cache_policy=NO_CACHE)
def score_samples(model: TrainedLDM, params: Params, real: Reference) -> tuple[dict[str, float], Samples]:
    ev = params.eval
    samples = sample(model, real.conditions(ev.samples, seed=params.seed), params, ev.sample_steps, ev.sampler)
    intervals = {"bootstrap": ev.bootstrap_rounds, "confidence": ev.confidence, "seed": params.seed}
    metrics = real.score(samples.images, full=True, **intervals) | {"sample_img_per_s": samples.img_per_s}
    return metrics, samples


@task(cache_policy=NO_CACHE)
def throughput_curve(model: TrainedLDM, params: Params, real: Reference) -> list[evaluation.CurvePoint]:
    cond = real.conditions(params.eval.curve_samples, seed=params.seed + 1)
    return evaluation.ddim_curve(lambda steps: sample(model, cond, params, steps), real, params.eval.ddim_steps)


def samples_grid(samples: Samples, model: TrainedLDM) -> Image.Image:
    """Generated images grouped by their condition (class mode), else in rows of eight."""
    pil = to_pil(samples.images)
    cond = samples.cond.tolist()
    if model.conditioning.conditioner.mode == "class":
        rows = [
            (name, [pil[i] for i, c in enumerate(cond) if c == index][:GRID_PER_ROW])
            for index, name in enumerate(model.conditioning.classes)
        ]
        return labeled_grid([row for row in rows if row[1]])
    return labeled_grid([("samples", pil[i : i + GRID_PER_ROW]) for i in range(0, min(len(pil), 64), GRID_PER_ROW)])


def linked_metrics(run: mlflow.entities.Run) -> dict[str, float]:
    """The autoencoder's Table 8 numbers and the LDM's training throughput, for UI comparison."""
    metrics: dict[str, float] = {}
    if ae_run_id := autoencoder_run_of(run):
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
    params = params_from_run(
        ldm_run.data.params, keep=params, sections=("eval", "sweep", "reproduce"), complete=() if data else ("data",)
    )
    factor = int(ldm_run.data.tags[TAG_FACTOR])
    key = evaluation_key(params, run_id)
    with ReuseOrResume.claim(experiment_id, "evaluate", key, log=logger.info) as recorded:
        if (done := recorded.reusable) is not None:
            logger.info("Reusing finished evaluation %s of LDM run %s", done.info.run_id, run_id)
            return EvalRun(done.info.run_id, factor, run_id, done.data.metrics, reused=True)
        version = ldm_run.data.tags[TAG_DATA_VERSION]
        data = data or data_flow(params, experiment)
        if data.version != version:
            raise UserError(
                f"LDM run {run_id} was trained on data version {version}, but these data parameters give "
                f"{data.version}: run `latentlab reproduce {run_id}` to restore that version."
            )
        model = artifacts.load_ldm(run_id, workspace.data_dir(), seed=params.seed)
        split = reference_split(params)
        real = reference(params, version, experiment, split, model.conditioning.cond[split])
        note = evaluation.small_sample_note(params.eval.samples)
        if note:
            logger.warning("%s.", note)
        with (
            recorded.start(
                data_version=version,
                params=params.flat(),
                run_name=seeded_name(f"eval-f{factor}", params.seed),
                factor=factor,
                tags={
                    TAG_LDM_RUN: run_id,
                    TAG_AE_RUN: ldm_run.data.tags.get(TAG_AE_RUN, ""),
                    TAG_FID_EXTRACTOR: real.extractor.tag,
                    TAG_REFERENCE_SPLIT: split,
                    TAG_SMALL_SAMPLE: str(note is not None).lower(),
                    **({TAG_SMALL_SAMPLE_NOTE: note} if note else {}),
                },
                parent_run_id=parent_run_id,
            ) as run,
            progress.phase("evaluation"),
        ):
            metrics, samples = score_samples(model, params, real)
            metrics |= linked_metrics(ldm_run)
            mlflow.log_metrics(metrics)
            mlflow.log_image(samples_grid(samples, model), "samples.png")
            points = throughput_curve(model, params, real)
            for p in points:
                mlflow.log_metrics(
                    {"ddim_fid": p.fid, "ddim_kid_mean": p.kid_mean, "ddim_sample_img_per_s": p.img_per_s}, step=p.steps
                )
            title = f"f={factor}: FID vs sampling throughput ({real.extractor.tag})"
            mlflow.log_image(evaluation.plot_curve(points, title), "fid_vs_throughput.png")
            mlflow.log_dict([p.__dict__ for p in points], "ddim_curve.json")
            logger.info(
                "f=%d: FID %.4g [%.4g, %.4g], KID %.4g, precision %.3g, recall %.3g, %.3g samples/s (%s)",
                factor,
                metrics["fid"],
                metrics.get("fid_ci_low", float("nan")),
                metrics.get("fid_ci_high", float("nan")),
                metrics["kid_mean"],
                metrics["precision"],
                metrics["recall"],
                metrics["sample_img_per_s"],
                real.extractor.tag,
            )
        return EvalRun(run.info.run_id, factor, run_id, metrics, reused=False)
