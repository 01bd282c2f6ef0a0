"""Which network measures sample quality, and the real images it compares against.

The standard ``inception-v3-compat`` is used when its weights are given (numbers comparable with
papers); otherwise an offline domain CNN, trained once per data version on the train split's
labels, logged to MLflow and reused: from the local cache, else from its MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import mlflow
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from safetensors.torch import save_file

import components.features as features
from components.dataset import load_split, read_manifest
from components.evaluation import Reference
from components.features import Extractor
from components.params import Params
from components.tracking import latest_run, stage_run, use_experiment
from flows.data import DATA_DIR

STATE_DIR = Path(".latentlab")
TAG_EXTRACTOR_KEY = "latentlab.extractor_key"
TAG_FID_EXTRACTOR = "latentlab.fid_extractor"
INCEPTION_ENV = "LATENTLAB_INCEPTION_WEIGHTS"


def domain_extractor_key(params: Params, data_version: str) -> str:
    code = Path(features.__file__).read_bytes()
    blob = json.dumps([data_version, params.seed, params.eval.extractor_steps, hashlib.sha256(code).hexdigest()])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@task(cache_policy=NO_CACHE)
def domain_extractor(params: Params, data_version: str, experiment: str) -> Extractor:
    """The trained domain CNN for this data version: cached file, else its MLflow run, else train."""
    logger = get_run_logger()
    key = domain_extractor_key(params, data_version)
    local = STATE_DIR / "extractors" / f"domain-{key}.safetensors"
    if local.exists():
        return features.extractor_from_file(local)
    experiment_id = use_experiment(experiment)
    if done := latest_run(experiment_id, "evaluate", **{TAG_EXTRACTOR_KEY: key}):
        fetched = mlflow.artifacts.download_artifacts(run_id=done.info.run_id, artifact_path=f"extractor/{local.name}")
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fetched, local)
        return features.extractor_from_file(local)
    images, records = load_split(Path(DATA_DIR), "train")
    classes = read_manifest(Path(DATA_DIR))["classes"]
    labels = torch.tensor([classes.index(r.label) for r in records])
    logger.info(
        "Training the domain feature extractor on %d images, %d classes (once per data version)",
        len(images),
        len(classes),
    )
    with stage_run(
        "evaluate",
        data_version=data_version,
        params={"eval.extractor_steps": params.eval.extractor_steps, "seed": params.seed},
        run_name=f"extractor-{data_version[:8]}",
        tags={TAG_EXTRACTOR_KEY: key, "latentlab.role": "feature-extractor"},
        parent_run_id=active.info.run_id if (active := mlflow.active_run()) else None,
    ):
        client, run_id = mlflow.MlflowClient(), mlflow.active_run().info.run_id

        def log(step: int, metrics: dict[str, float]) -> None:
            client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, v, 0, step) for k, v in metrics.items()])

        state = features.train_domain_extractor(
            images, labels, len(classes), seed=params.seed, steps=params.eval.extractor_steps, log=log
        )
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_suffix(".partial")
        save_file(state, partial)
        partial.replace(local)
        mlflow.log_artifact(str(local), "extractor")
        extractor = features.extractor_from_file(local)
        mlflow.set_tag(TAG_FID_EXTRACTOR, extractor.tag)
    return extractor


def choose_extractor(params: Params, data_version: str, experiment: str) -> Extractor:
    """``eval.extractor``: auto = Inception when weights are given (param or env), else domain."""
    weights = params.eval.inception_weights or os.environ.get(INCEPTION_ENV)
    mode = params.eval.extractor
    if mode == "inception" or (mode == "auto" and weights):
        return features.inception_extractor(weights)
    return domain_extractor(params, data_version, experiment)


def reference(
    params: Params, data_version: str, experiment: str, cond: dict[str, torch.Tensor] | None = None
) -> Reference:
    """The real images of ``eval.reference_split`` (with their condition indices) to compare with."""
    split = params.eval.reference_split
    images, _ = load_split(Path(DATA_DIR), split)
    extractor = choose_extractor(params, data_version, experiment)
    indices = cond[split] if cond is not None else torch.zeros(len(images), dtype=torch.long)
    return Reference.of(
        images, indices, extractor, data_version=data_version, split=split, cache_dir=STATE_DIR / "fidelity-cache"
    )
