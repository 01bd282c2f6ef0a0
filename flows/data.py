"""The data flow: source -> prepared ``data/`` -> DVC version (pushed) -> MLflow ``data`` run.

A second run with the same source and parameters finds ``data/`` current and changes nothing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import mlflow
from PIL import Image
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components import dvc, ownership, progress, workspace
from components.credentials import redact
from components.dataset import build_dataset, is_current, read_manifest, read_records, remember_build
from components.grids import labeled_grid
from components.params import DataParams, Params, flatten
from components.runs import data_build_key
from components.sources import load_source
from components.workspace import DATA_DIR
from flows.stage import DataVersion, Stage, run_stage


@task(cache_policy=NO_CACHE)
def prepare_data(params: DataParams, root: Path) -> tuple[dict, str, bool]:
    """Build ``data/`` unless it is current; return its manifest, its build key and whether it
    was (re)built."""
    logger = get_run_logger()
    source = load_source(params)
    build = data_build_key(source.fingerprint)
    if is_current(root, build, dvc.version(root)) and dvc.is_up_to_date(root):
        logger.info("data/ is current for these parameters: nothing to rebuild")
        return read_manifest(root / DATA_DIR), build, False
    logger.info("Preparing %d images from %s at %d px", len(source.items), params.source, params.resolution)
    manifest = build_dataset(
        source.items,
        source.bad,
        root / DATA_DIR,
        resolution=params.resolution,
        val_fraction=params.val_fraction,
        upscale=params.upscale,
        strict=params.strict,
        description=source.description,
    )
    for skipped in manifest["skipped"]:
        logger.warning("Skipped %s: %s", skipped["file"], skipped["reason"])
    return manifest, build, True


@task(cache_policy=NO_CACHE)
def data_version_here(params: DataParams, version: str, root: Path = Path(".")) -> Path:
    """The folder holding data version ``version`` on this machine: the project's ``data/`` when
    it is at that version, else a checkout restored from the DVC cache or remote
    (``data.remote``) under ``.latentlab/``; the project's ``data/`` is left as it is."""
    root = Path(root).resolve()
    dvc.check_version(version)  # (before it names a lock or a folder)
    if dvc.version(root) == version and dvc.is_up_to_date(root):
        return root / DATA_DIR
    remote = params.remote if "://" in params.remote else str((root / params.remote).resolve())
    log = get_run_logger().info
    with ownership.key_lock(f"data-{version}", log):  # one restore of a version at a time
        log("Reading data version %s from a checkout of the DVC cache or %s", version, redact(remote))
        return dvc.restore(
            version,
            root / workspace.version_checkout(version),
            cache_dir=workspace.dvc_cache(root),
            remote=remote,
            endpoint=params.remote_endpoint,
        )


@task(cache_policy=NO_CACHE)
def version_data(params: DataParams, root: Path, build: str, rebuilt: bool) -> str:
    """``dvc add`` (when rebuilt) + ``dvc push``; the version is the md5 in data.dvc."""
    target = str(DATA_DIR)
    version = dvc.add(root, target) if rebuilt else dvc.version(root)
    remember_build(root, build, version)
    if dvc.use_remote(root, params.remote, params.remote_endpoint):
        get_run_logger().info(
            "The DVC remote %s is now in .dvc/config: commit it (git add .dvc/config) so clones can `dvc pull`",
            redact(params.remote),
        )
    problem = dvc.unreachable(params.remote, params.remote_endpoint)
    if problem:  # the version is in the local DVC cache: everything on this machine goes on
        get_run_logger().warning(
            "Data version %s NOT pushed: the remote %s is unreachable (%s). Run `dvc push -r %s` when it is back.",
            version,
            redact(params.remote),
            problem,
            dvc.REMOTE_NAME,
        )
        return version
    dvc.push(root, target)
    get_run_logger().info("Data version %s pushed to %s", version, redact(params.remote))
    return version


class DataStage(Stage):
    """One MLflow ``data`` run per data version: counts, parameters, bad-file report, sample grid."""

    name = "data"
    sections = ()  # the version is the identity: same bytes, same run

    def __init__(self, params: Params, data: DataVersion, root: Path, experiment: str = "latentlab"):
        super().__init__(params, data, experiment)
        self.root = root

    def run_name(self) -> str:
        return f"data-{self.data.version[:8]}"

    def logged_params(self) -> dict[str, Any]:
        return flatten({"data": self.params.data.model_dump(mode="json")})

    def publish(self, run_id: str) -> None:
        manifest = self.data.manifest
        counts = manifest["counts"]
        mlflow.log_metrics({f"n_{split}": counts[split] for split in ("total", "train", "val", "skipped")})
        mlflow.log_metric("n_classes", len(manifest["classes"]))
        for label, per_split in counts["per_class"].items():
            mlflow.log_metric(f"class_count/{_slug(label)}", per_split["train"] + per_split["val"])
        mlflow.log_dict(manifest, "manifest.json")
        mlflow.log_image(_sample_grid(self.root / DATA_DIR, self.params.data.grid_per_class), "samples_per_class.png")


def _sample_grid(data_dir: Path, per_class: int) -> Image.Image:
    rows: dict[str, list[Image.Image]] = {}
    for record in read_records(data_dir):
        row = rows.setdefault(record.label, [])
        if len(row) < per_class:
            row.append(Image.open(data_dir / record.file).convert("RGB"))
    return labeled_grid(sorted(rows.items()))


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


@flow(name="data")
def data_flow(params: Params, experiment: str = "latentlab", root: Path = Path(".")) -> DataVersion:
    """Prepare, version and record the dataset that ``params.data`` describes."""
    root = Path(root).resolve()
    dvc.ensure_repo(root)
    with (
        progress.phase("data"),
        ownership.key_lock("data-build", get_run_logger().info),
    ):  # one builder of data/ at a time
        manifest, build, rebuilt = prepare_data(params.data, root)
        version = version_data(params.data, root, build, rebuilt)
        recorded = run_stage(DataStage(params, DataVersion(version, "", manifest), root, experiment))
    return DataVersion(version, recorded.run_id, manifest)
