"""The extractor stage, and the real images samples are compared against.

The standard ``inception-v3-compat`` is used when its weights are given (numbers comparable with
papers; ``components.evaluation.uses_inception``); otherwise an offline domain CNN, trained once
per data version on the train split's labels as an ``evaluate`` run with the role
``feature-extractor``, and reused: from the local copy, else from its MLflow run.
"""

from __future__ import annotations

import os
import shutil
import time

import mlflow
import torch
from mlflow.entities import Run
from safetensors import SafetensorError
from safetensors.torch import save_file

import components.features as features
from components import workspace
from components.contract import TAG_FID_EXTRACTOR, TAG_ROLE
from components.dataset import load_split, read_manifest
from components.evaluation import uses_inception
from components.features import INCEPTION_ENV, Extractor
from components.params import Params
from components.tracking import log_metrics
from flows.stage import DataVersion, Stage, log, run_stage

ARTIFACT_DIR = "extractor"


class ExtractorStage(Stage):
    """One network per data version (seed 0 always: every seed of a sweep is scored by it)."""

    name, title = "evaluate", "domain extractor"
    code = ("components.features",)
    sections = ("eval.extractor_steps",)

    def upstream(self) -> list[str]:
        return ["extractor", self.data.version]  # (its own kind of evaluate run)

    def run_name(self) -> str:
        return f"extractor-{self.data.version[:8]}"

    @property
    def local(self):
        return workspace.extractor_file(self.key())

    def reuse(self, run: Run) -> None:
        fetched = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path=f"{ARTIFACT_DIR}/{self.local.name}"
        )
        workspace.write_atomically(self.local, lambda partial: shutil.copyfile(fetched, partial))

    def prepare(self, resumed: Run | None) -> None:
        self.classes = read_manifest(workspace.data_dir())["classes"]
        self.train_split, self.val_split = (_labelled(split, self.classes) for split in ("train", "val"))

    def tags(self) -> dict[str, str]:
        return {TAG_ROLE: "feature-extractor"}

    def train(self, run_id: str, resuming: bool) -> None:
        (images, labels), (val_images, val_labels) = self.train_split, self.val_split
        steps = self.params.eval.extractor_steps
        log.info(
            "Training the domain feature extractor on %d images, %d classes (once per data version)",
            len(images),
            len(self.classes),
        )
        started = time.perf_counter()
        state = features.train_domain_extractor(
            images, labels, len(self.classes), steps=steps, log=lambda step, metrics: log_metrics(run_id, metrics, step)
        )
        # Its training time, as the autoencoder and LDM runs record theirs.
        seconds = time.perf_counter() - started
        scores = features.held_out_scores(state, val_images, val_labels)
        metrics = {
            "extractor_val_acc": scores["accuracy"],
            "extractor_val_balanced_acc": scores["balanced_accuracy"],  # mean per-class recall
            "extractor_val_majority_rate": scores["majority_rate"],  # what always answering one class scores
        }
        log_metrics(run_id, metrics | {"wall_time_s": seconds}, steps)
        log.info(
            "Domain extractor: %.1f %% held-out accuracy (majority class %.1f %% of val), balanced accuracy "
            "%.1f %% on %d classes (chance %.1f %%)",
            100 * scores["accuracy"],
            100 * scores["majority_rate"],
            100 * scores["balanced_accuracy"],
            len(self.classes),
            100 / len(self.classes),
        )
        workspace.write_atomically(self.local, lambda partial: save_file(state, partial))

    def publish(self, run_id: str) -> None:
        mlflow.log_artifact(str(self.local), ARTIFACT_DIR)
        mlflow.set_tag(TAG_FID_EXTRACTOR, features.extractor_from_file(self.local).tag)


def _labelled(split: str, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's images and the index of each one's class (-1 for a class the manifest lacks)."""
    images, records = load_split(workspace.data_dir(), split)
    return images, torch.tensor([classes.index(r.label) if r.label in classes else -1 for r in records])


def choose_extractor(params: Params, data: DataVersion, experiment: str) -> Extractor:
    """Inception when its weights are given, else the domain CNN of this data version: its local
    copy, else its MLflow run, else trained now."""
    if uses_inception(params.eval):
        return features.inception_extractor(params.eval.inception_weights or os.environ.get(INCEPTION_ENV))
    stage = ExtractorStage(params, data, experiment)
    if stage.local.exists():
        try:
            return features.extractor_from_file(stage.local)
        except SafetensorError:
            log.warning("The extractor copy %s is damaged; fetching it again", stage.local)
    active = mlflow.active_run()
    run_stage(stage, parent_run_id=active.info.run_id if active else None)
    return features.extractor_from_file(stage.local)
