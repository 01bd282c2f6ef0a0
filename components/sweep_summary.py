"""A sweep as recorded in MLflow: one row per factor, read back from the runs the sweep names.

A sweep run records, per factor f, the ids of its autoencoder, LDM and evaluate runs
(``FactorEntry``, below); everything here is read back from those runs, so a report can
be regenerated long after the sweep, on another machine, from the tracking store only.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any

import mlflow
from PIL import Image

from components.contract import (
    FACTOR_TAG_PREFIX,
    TAG_BUDGET,
    TAG_CHANGED_PARAMS,
    TAG_DATA_VERSION,
    TAG_FID_EXTRACTOR,
    TAG_GIT_COMMIT,
    TAG_GIT_DIRTY,
    TAG_LATENT_SHAPE,
    TAG_MACHINE,
    TAG_PRECISION,
    TAG_REFERENCE_SPLIT,
    TAG_SEED,
    TAG_SMALL_SAMPLE,
    TASK_METRICS,
)

TASK_METRIC_NAMES = {name for metrics in TASK_METRICS.values() for name, _, _ in metrics}
EVALUATE_METRICS = (
    "fid", "fid_ci_low", "fid_ci_high", "kid_mean", "kid_std", "kid_ci_low", "kid_ci_high",
    "precision", "recall", "sample_img_per_s", "fid_inf", "fid_inf_ci_low", "fid_inf_ci_high",
)  # fmt: skip


@dataclass(frozen=True)
class BudgetPoint:
    """One evaluation during training."""

    step: int
    train_s: float  # training seconds before it (batches only: no sampling, checkpoints or logging)
    kid: float
    low: float | None  # the KID's bootstrap interval over the evaluation's samples, where recorded
    high: float | None


@dataclass
class FactorRow:
    """Everything the report shows for one downsampling factor; ``None`` where a run or metric is missing."""

    factor: int
    status: str = "missing"
    latent_shape: str | None = None
    rfid: float | None = None
    psnr: float | None = None
    ssim: float | None = None
    fid: float | None = None
    fid_ci_low: float | None = None  # the evaluation's bootstrap interval, where recorded
    fid_ci_high: float | None = None
    kid_mean: float | None = None
    kid_std: float | None = None
    kid_ci_low: float | None = None
    kid_ci_high: float | None = None
    fid_inf: float | None = None  # FID extrapolated to infinitely many samples, and its interval
    fid_inf_ci_low: float | None = None
    fid_inf_ci_high: float | None = None
    precision: float | None = None
    recall: float | None = None
    ldm_img_per_s: float | None = None  # mean of the LDM's train_img_per_s history
    ae_img_per_s: float | None = None  # mean of the autoencoder's train_img_per_s history
    sample_img_per_s: float | None = None
    ldm_steps: int | None = None
    wall_time_s: float | None = None  # autoencoder + LDM training
    flops_per_step: float | None = None
    fid_extractor: str | None = None  # of the evaluate run: the one the verdict's FID comes from
    small_sample: bool = False
    runs: dict[str, str] = field(default_factory=dict)  # stage name -> run id, of the runs that exist
    budget_curve: list[BudgetPoint] = field(default_factory=list)  # KID during the LDM's training
    ldm_fid_extractor: str | None = None
    ddim: list[tuple[int, float, float]] = field(default_factory=list)  # (DDIM steps, kid, sample img/s)
    samples: Image.Image | None = None  # the LDM's samples_final.png
    seed: int | None = None  # the training seed (tag latentlab.seed of its LDM run)
    trained_in: dict[str, str] = field(default_factory=dict)  # training stage -> the precision it trained in
    n_samples: int | None = None  # generated images the evaluation scored ...
    n_reference: int | None = None  # ... against this many real ones
    reference_split: str | None = None  # ... of this split
    repeats: list[FactorRow] = field(default_factory=list)  # the same f at the sweep's other seeds
    task_metrics: dict[str, float] = field(
        default_factory=dict
    )  # the evaluation's ``tasks.TASK_METRICS`` (+ intervals)

    @property
    def all_seeds(self) -> list[FactorRow]:
        """This row and its repeats: one per training seed."""
        return [self, *self.repeats]


@dataclass
class SweepSummary:
    """One sweep as the report sees it: its identity, its budget and a row per factor (ascending f),
    and where it came from (the provenance a report states)."""

    run_id: str
    run_name: str
    data_version: str | None
    budget: str | None
    rows: list[FactorRow]
    experiment_id: str = "0"
    experiment: str = "latentlab"
    started_ms: int = 0
    commit: str | None = None
    dirty: bool = False
    machine: str | None = None
    params: dict[str, str] = field(default_factory=dict)  # as logged on the sweep run (dotted keys)
    changed_params: dict[str, Any] | None = None  # those that differ from params/default.yaml; None: unknown

    @property
    def task(self) -> str:
        """What the sweep's denoisers do (``ldm.task``; sweeps before tasks generated)."""
        return self.params.get("ldm.task", "generate")


# ------------------------------------------------------------- the sweep's record, per (factor, repeat)

FINISHED = "finished"
OLD_STAGE_NAMES = {"ae": "autoencoder"}  # as sweeps before stage-named entries wrote them


@dataclass(frozen=True)
class FactorEntry:
    """The runs that answer for one factor (and repeat) of a sweep, by stage, and how far it got.
    Any stage a factor runs is recorded by its name: a new stage needs no field here."""

    runs: dict[str, str] = field(default_factory=dict)  # stage name -> run id, in the order they ran
    status: str = "queued"  # queued | running | finished | "failed: <why>"

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    def run(self, stage: str) -> str:
        """The run id of ``stage``, or "" when the factor has none (yet)."""
        return self.runs.get(stage, "")

    def with_run(self, stage: str, run_id: str) -> FactorEntry:
        """This entry with ``stage``'s run recorded (an empty id records nothing: pixel space
        has no autoencoder run)."""
        return replace(self, runs={**self.runs, stage: run_id}) if run_id else self


def factor_tag(factor: int, repeat: int = 0) -> str:
    """``latentlab.sweep.f8``; with ``sweep.seeds`` > 1, repeat r (seed = seed + r) is ``...f8.r<r>``."""
    return f"{FACTOR_TAG_PREFIX}{factor}" + (f".r{repeat}" if repeat else "")


def write_factor_entry(sweep_run_id: str, factor: int, entry: FactorEntry, repeat: int = 0) -> None:
    """The tag's JSON: each stage's run id under the stage's name, and ``status``."""
    value = json.dumps({**entry.runs, "status": entry.status})
    mlflow.MlflowClient().set_tag(sweep_run_id, factor_tag(factor, repeat), value)


def read_sweep_entries(tags: dict[str, str]) -> dict[tuple[int, int], FactorEntry]:
    """Every (factor, repeat) a sweep run recorded; a damaged tag reads as an unfinished entry
    that says so (a sweep then redoes it; a report shows it)."""
    entries = {}
    for name, value in tags.items():
        cell = _cell(name.removeprefix(FACTOR_TAG_PREFIX)) if name.startswith(FACTOR_TAG_PREFIX) else None
        if cell is None:
            continue
        try:
            fields = json.loads(value)
            if not isinstance(fields, dict):
                raise TypeError(f"not an object: {type(fields).__name__}")
            status = str(fields.pop("status", None) or "unknown")
            runs = {OLD_STAGE_NAMES.get(k, k): str(v) for k, v in fields.items() if v}
            entries[cell] = FactorEntry(runs, status)
        except (ValueError, TypeError, AttributeError):
            entries[cell] = FactorEntry(status=f"unreadable tag: {value!r}")
    return entries


def read_factor_entries(tags: dict[str, str], repeat: int = 0) -> dict[int, FactorEntry]:
    """Each factor's entry for one repeat (the first seed unless told)."""
    return {f: entry for (f, r), entry in read_sweep_entries(tags).items() if r == repeat}


def _cell(suffix: str) -> tuple[int, int] | None:
    """ "8" -> (8, 0), "8.r2" -> (8, 2); anything else is not a factor tag."""
    factor, _, repeat = suffix.partition(".r")
    digits = [factor, repeat or "0"]
    if not all(d.isascii() and d.isdigit() for d in digits):
        return None
    return int(factor), int(repeat or 0)


# ----------------------------------------------------------------------------------------- collect


def collect(sweep_run_id: str, client: mlflow.MlflowClient | None = None, images: bool = True) -> SweepSummary:
    """Read a sweep and its children from MLflow; missing runs, metrics or artifacts become
    ``None``. ``images``: also download each factor's sample grid (for the report)."""
    client = client or mlflow.MlflowClient()
    sweep = client.get_run(sweep_run_id)
    tags = sweep.data.tags
    entries = read_sweep_entries(tags)
    factors = {f for f, _ in entries} | set(_factors_param(sweep.data.params.get("sweep.factors")))
    rows = [_row(client, f, entries.get((f, 0)), images) for f in sorted(factors)]
    for row in rows:
        repeats = sorted(r for f, r in entries if f == row.factor and r > 0)
        row.repeats = [_row(client, row.factor, entries[(row.factor, r)], images=False) for r in repeats]
    return SweepSummary(
        run_id=sweep_run_id,
        run_name=sweep.info.run_name or sweep_run_id,
        data_version=tags.get(TAG_DATA_VERSION),
        budget=tags.get(TAG_BUDGET),
        rows=rows,
        experiment_id=sweep.info.experiment_id,
        experiment=client.get_experiment(sweep.info.experiment_id).name,
        started_ms=sweep.info.start_time or 0,
        commit=tags.get(TAG_GIT_COMMIT),
        dirty=tags.get(TAG_GIT_DIRTY, "").lower() == "true",
        machine=tags.get(TAG_MACHINE),
        params=dict(sweep.data.params),
        changed_params=_json_object(tags.get(TAG_CHANGED_PARAMS)),
    )


def _json_object(value: str | None) -> dict[str, Any] | None:
    try:
        found = json.loads(value) if value else None
    except ValueError:  # (a tag edited by hand, or "too many to tag")
        return None
    return found if isinstance(found, dict) else None


def _factors_param(value: str | None) -> list[int]:
    try:
        return [int(f) for f in json.loads(value or "[]")]
    except (ValueError, TypeError):
        return []


def _row(client: mlflow.MlflowClient, factor: int, child: FactorEntry | None, images: bool = True) -> FactorRow:
    row = FactorRow(factor)
    if child is None:
        return row  # planned in sweep.factors, never started
    row.status = child.status
    found = {stage: _get_run(client, run_id) for stage, run_id in child.runs.items()}
    row.runs = {stage: run.info.run_id for stage, run in found.items() if run is not None}
    ae, ldm, ev = (found.get(stage) for stage in ("autoencoder", "ldm", "evaluate"))
    row.trained_in = {
        stage: run.data.tags[TAG_PRECISION] for stage, run in found.items() if run and TAG_PRECISION in run.data.tags
    }
    wall = []
    if ae is not None:
        m = ae.data.metrics
        row.rfid, row.psnr, row.ssim = m.get("rfid"), m.get("psnr"), m.get("ssim")
        row.ae_img_per_s = _mean(_history(client, ae.info.run_id, "train_img_per_s"))
        wall.append(m.get("wall_time_s"))
    if ldm is not None:
        m = ldm.data.metrics
        row.latent_shape = ldm.data.tags.get(TAG_LATENT_SHAPE)
        row.ldm_img_per_s = _mean(_history(client, ldm.info.run_id, "train_img_per_s"))
        row.ldm_steps = int(m["steps"]) if "steps" in m else None
        row.flops_per_step = m.get("flops_per_step")
        curve_metrics = ("kid_mean", "kid_ci_low", "kid_ci_high", "train_s")
        row.budget_curve = curve_of({k: _history(client, ldm.info.run_id, k) for k in curve_metrics})
        row.ldm_fid_extractor = ldm.data.tags.get(TAG_FID_EXTRACTOR)
        row.samples = _image(client, ldm.info.run_id, "samples_final.png") if images else None
        row.seed = int(ldm.data.tags[TAG_SEED]) if ldm.data.tags.get(TAG_SEED, "").isdigit() else None
        wall.append(m.get("wall_time_s"))
    if ev is not None:
        m = ev.data.metrics
        for name in EVALUATE_METRICS:
            setattr(row, name, m.get(name))
        row.fid_extractor = ev.data.tags.get(TAG_FID_EXTRACTOR)
        row.reference_split = ev.data.tags.get(TAG_REFERENCE_SPLIT)
        row.n_samples, row.n_reference = (int(m[k]) if k in m else None for k in ("samples", "reference_images"))
        row.small_sample = ev.data.tags.get(TAG_SMALL_SAMPLE, "").lower() == "true"
        row.task_metrics = {k: v for k, v in m.items() if k.split("_ci_")[0] in TASK_METRIC_NAMES}
        kid, speed = (_history(client, ev.info.run_id, k) for k in ("ddim_kid_mean", "ddim_sample_img_per_s"))
        row.ddim = [(s, kid[s], speed[s]) for s in sorted(kid) if s in speed]
    known = [w for w in wall if w is not None]
    row.wall_time_s = sum(known) if known else None
    return row


def curve_of(history: dict[str, dict[int, float]]) -> list[BudgetPoint]:
    """The curve from an LDM run's metric histories (name -> step -> value): its ``kid_mean``
    points with ``train_s`` (runs from before budget curves logged it have none: empty)."""
    kid, train_s = history.get("kid_mean", {}), history.get("train_s", {})
    low, high = history.get("kid_ci_low", {}), history.get("kid_ci_high", {})
    return [BudgetPoint(s, train_s[s], kid[s], low.get(s), high.get(s)) for s in sorted(kid) if s in train_s]


def _get_run(client: mlflow.MlflowClient, run_id: str | None) -> mlflow.entities.Run | None:
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except mlflow.exceptions.MlflowException:  # deleted, or an id from another store
        return None


def _history(client: mlflow.MlflowClient, run_id: str, key: str) -> dict[int, float]:
    """step -> value; a step logged twice (a resumed run) keeps its latest value."""
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
    return {int(m.step): float(m.value) for m in points if math.isfinite(m.value)}


def _mean(history: dict[int, float]) -> float | None:
    return sum(history.values()) / len(history) if history else None


def _image(client: mlflow.MlflowClient, run_id: str, path: str) -> Image.Image | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
            with Image.open(local) as image:
                return image.convert("RGB")
        except (mlflow.exceptions.MlflowException, OSError):
            return None
