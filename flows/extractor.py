"""Which network measures sample quality, and the real images it compares against.

The standard ``inception-v3-compat`` is used when its weights are given (numbers comparable with
papers); otherwise an offline domain CNN, trained once per data version on the train split's
labels, logged to MLflow and reused: from the local cache, else from its MLflow run.
"""

from __future__ import annotations

import os
import shutil
import time

import mlflow
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from safetensors import SafetensorError
from safetensors.torch import save_file

import components.features as features
from components import progress, workspace
from components.dataset import load_split, read_manifest
from components.features import INCEPTION_ENV, Extractor
from components.metrics import Reference
from components.params import Params
from components.runs import TAG_FID_EXTRACTOR, TAG_ROLE, ReuseOrResume, extractor_key
from components.tracking import log_metrics, use_experiment

ARTIFACT_DIR = "extractor"


@task(cache_policy=NO_CACHE)
def domain_extractor(params: Params, data_version: str, experiment: str) -> Extractor:
    """The trained domain CNN for this data version: cached file, else its MLflow run, else train."""
    key = extractor_key(params, data_version)
    local = workspace.extractor_file(key)
    if local.exists():
        try:
            return features.extractor_from_file(local)
        except SafetensorError:
            get_run_logger().warning("The extractor copy %s is damaged; fetching it again", local)
    with ReuseOrResume.claim(use_experiment(experiment), "evaluate", key, log=get_run_logger().info) as recorded:
        if recorded.reusable is not None:
            run_id = recorded.reusable.info.run_id
            fetched = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{ARTIFACT_DIR}/{local.name}")
            workspace.write_atomically(local, lambda partial: shutil.copyfile(fetched, partial))
            return features.extractor_from_file(local)
        classes = read_manifest(workspace.data_dir())["classes"]
        (images, labels), (val_images, val_labels) = (_labelled(split, classes) for split in ("train", "val"))
        get_run_logger().info(
            "Training the domain feature extractor on %d images, %d classes (once per data version)",
            len(images),
            len(classes),
        )
        with (
            recorded.start(
                data_version=data_version,
                params={"eval.extractor_steps": params.eval.extractor_steps},
                run_name=f"extractor-{data_version[:8]}",
                tags={TAG_ROLE: "feature-extractor"},
                parent_run_id=active.info.run_id if (active := mlflow.active_run()) else None,
            ) as run,
            progress.phase("domain extractor training"),
        ):
            started = time.perf_counter()
            state = features.train_domain_extractor(
                images,
                labels,
                len(classes),
                steps=params.eval.extractor_steps,  # seed 0 always: one network per data version
                log=lambda step, metrics: log_metrics(run.info.run_id, metrics, step),
            )
            # Its training time, as the autoencoder and LDM runs record theirs.
            wall_time_s = time.perf_counter() - started
            accuracy = features.held_out_accuracy(state, val_images, val_labels)
            metrics = {"extractor_val_acc": accuracy, "wall_time_s": wall_time_s}
            log_metrics(run.info.run_id, metrics, params.eval.extractor_steps)
            get_run_logger().info(
                "Domain extractor: %.1f %% held-out accuracy on %d classes", 100 * accuracy, len(classes)
            )
            workspace.write_atomically(local, lambda partial: save_file(state, partial))
            mlflow.log_artifact(str(local), ARTIFACT_DIR)
            extractor = features.extractor_from_file(local)
            mlflow.set_tag(TAG_FID_EXTRACTOR, extractor.tag)
        return extractor


def _labelled(split: str, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's images and the index of each one's class (-1 for a class the manifest lacks)."""
    images, records = load_split(workspace.data_dir(), split)
    return images, torch.tensor([classes.index(r.label) if r.label in classes else -1 for r in records])


def choose_extractor(params: Params, data_version: str, experiment: str) -> Extractor:
    """``eval.extractor``: auto = Inception when weights are given (param or env), else domain."""
    if uses_inception(params):
        return features.inception_extractor(params.eval.inception_weights or os.environ.get(INCEPTION_ENV))
    return domain_extractor(params, data_version, experiment)


def uses_inception(params: Params) -> bool:
    """``eval.extractor``: auto = Inception when weights are given (param or env), else domain."""
    weights = params.eval.inception_weights or os.environ.get(INCEPTION_ENV)
    return params.eval.extractor == "inception" or (params.eval.extractor == "auto" and bool(weights))


def reference_split(params: Params) -> str:
    """``eval.reference_split``; auto: images the feature network never saw. The domain
    extractor trains on the train split and would reward memorising it, so it is scored
    against val; Inception never saw this data, so train, as the paper."""
    if params.eval.reference_split != "auto":
        return params.eval.reference_split
    return "train" if uses_inception(params) else "val"


def reference(
    params: Params, data_version: str, experiment: str, split: str, cond: torch.Tensor | None = None
) -> Reference:
    """The real images of ``split`` (with their condition indices; else all 0) to compare with."""
    images, _ = load_split(workspace.data_dir(), split)
    extractor = choose_extractor(params, data_version, experiment)
    indices = cond if cond is not None else torch.zeros(len(images), dtype=torch.long)
    return Reference.of(
        images, indices, extractor, data_version=data_version, split=split, cache_dir=workspace.fidelity_cache()
    )
