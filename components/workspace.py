"""Where a project keeps its files: every path latentlab reads or writes below the working
directory, named here so that a reader (or a later change that moves state elsewhere) finds them
all in one place:

- the prepared dataset ``data/``, DVC's record of it ``data.dvc`` and DVC's folder ``.dvc/``
  (its config and cache), in the project and in each data version's checkout;
- the default parameters ``params/default.yaml`` (else the copy latentlab is installed with);
- the default MLflow store: ``mlflow.db`` and its artifacts ``mlartifacts/``;
- the ``.latentlab/`` state folder and the sweep reports under ``reports/``.

It owns their names only (and which dataset the stages read, ``reading_data``); what is in the
files belongs to the modules that write them.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

RESULT_NEUTRAL = True  # where files lie, never what a run computes: not part of any stage's code identity

DATA_DIR = Path("data")
DATA_DVC = Path("data.dvc")  # DVC names it after data/; its md5 is the data version
DVC_DIR = Path(".dvc")
PARAMS_FILE = Path("params") / "default.yaml"
TRACKING_DB = Path("mlflow.db")  # the MLflow store while MLFLOW_TRACKING_URI is unset (SQLite)
ARTIFACTS_DIR = Path("mlartifacts")  # that store's run artifacts
STATE_DIR = Path(".latentlab")
REPORTS_DIR = Path("reports")

_reading = ContextVar("latentlab_data_dir", default=DATA_DIR)


def data_dir() -> Path:
    """The prepared dataset the stages read: the project's ``data/``, unless the caller is
    inside ``reading_data``."""
    return _reading.get()


@contextmanager
def reading_data(folder: Path) -> Iterator[None]:
    """The stages called inside read the dataset from ``folder``: a checkout of the data
    version they work on (``version_checkout``) where the project's ``data/`` holds another.
    (A context variable, not the working directory: it follows Prefect's subflows and tasks
    and touches nothing else in the process.)"""
    token = _reading.set(Path(folder))
    try:
        yield
    finally:
        _reading.reset(token)


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """``write(temporary)`` then rename it to ``path``: a crash never leaves half a file there,
    and two processes writing the same file never write into one temporary (unique names). The
    temporary's bytes reach the disk before the rename, and the rename before this returns, so
    a power loss leaves the old file or the new one, never an empty one (what the rename alone
    gives on ext4/XFS once the page cache is lost)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    try:
        write(partial)
        _fsync(partial)
        partial.replace(path)
        _fsync(path.parent)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def dvc_config(root: Path, local: bool = False) -> Path:
    """The DVC config of the DVC project at ``root``: ``config`` (git tracks it: shared remotes)
    or ``config.local`` (this machine's remote directory and endpoint)."""
    return root / DVC_DIR / ("config.local" if local else "config")


def dvc_cache(root: Path) -> Path:
    """The DVC cache of the DVC project at ``root``: every data version built or pulled there."""
    return root / DVC_DIR / "cache"


def default_params() -> Path:
    """The parameters a command runs with when given none: the project's ``params/default.yaml``,
    else the one beside the installed latentlab (a command run outside a checkout)."""
    return PARAMS_FILE if PARAMS_FILE.exists() else Path(__file__).resolve().parents[1] / PARAMS_FILE


def data_state_file() -> Path:
    """Which source fingerprint ``data/`` was last built from, and its DVC version."""
    return STATE_DIR / "data-state.json"


def checkpoint_dir(stage: str, run_id: str) -> Path:
    """Resumable Lightning checkpoints of one training run, by its MLflow run id: an interrupted
    run is reopened under the same id and resumes; a fresh run of the same key (``reproduce``)
    starts from scratch rather than from the original's last checkpoint."""
    return STATE_DIR / "checkpoints" / f"{stage}-{run_id}"


def latent_cache(first_stage_id: str) -> Path:
    """The dataset encoded by one first stage (an autoencoder run, or pixel space)."""
    return STATE_DIR / "latents" / f"{first_stage_id}.safetensors"


def task_cache(first_stage_id: str, inputs: str) -> Path:
    """Training inputs of a task that one first stage encodes (inpainting's masked images), by
    what draws them (``inputs``: the task, its settings and the seed)."""
    return STATE_DIR / "latents" / f"{first_stage_id}-{inputs}.safetensors"


def model_dir(run_id: str) -> Path:
    """A downloaded copy of a run's model artifacts (``run_id`` checked: ``artifacts.local_copy``)."""
    return STATE_DIR / "models" / run_id


def extractor_file(key: str) -> Path:
    """The trained domain feature extractor of one data version."""
    return STATE_DIR / "extractors" / f"domain-{key}.safetensors"


def fidelity_cache() -> Path:
    """torch-fidelity's cache of reference-set features."""
    return STATE_DIR / "fidelity-cache"


def precision_cache() -> Path:
    """bf16 against fp32 measured on this machine's processor (``components.precision``), one
    file per processor, torch version, model and size."""
    return STATE_DIR / "precision"


def report_dir(sweep_run_id: str, started_ms: int) -> Path:
    """One sweep's report, named so that a listing sorts by date: the day the sweep started (UTC)
    and its run id's first 8 characters (``reports/2026-12-05-sweep-0e350911``). Never by its run
    name, which anyone can edit in the MLflow UI (to ``../..`` or an absolute path)."""
    day = time.strftime("%Y-%m-%d", time.gmtime(started_ms / 1000))
    return REPORTS_DIR / f"{day}-sweep-{sweep_run_id[:8]}"


def lock_file(name: str) -> Path:
    """This machine's lock on one run key (``components.ownership.key_lock``)."""
    return STATE_DIR / "locks" / f"{name}.lock"


def version_checkout(version: str) -> Path:
    """A DVC checkout of one data version, restored from the DVC cache or remote, for the
    stages that need a version the project's ``data/`` does not hold (``reproduce``, a factor
    on a worker whose checkout built another or none)."""
    return STATE_DIR / "data-versions" / version.removesuffix(".dir")
