"""MLflow plumbing: where runs go, whether the store can be used, how metrics reach them. (What
a run *is* and how it is found again: ``components.runs``; the Lightning callbacks that report
training: ``components.mlflow_callbacks``.)
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import mlflow

from components import ownership
from components.errors import UserError

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlartifacts"
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
DEFAULT_EXPERIMENT = "latentlab"

# user:password@ (the password may hold "/" and "@": up to the last "@"), or a bare token@
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?:[^/:@\s]+:\S*|[^/@\s]+)@", re.IGNORECASE)


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else ``mlflow.db`` in the working directory (made absolute so a
    later change of directory cannot point the same process at another database)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or _default_uri()


def _default_uri() -> str:
    return f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def check_store(uri: str | None = None) -> None:
    """Fail in seconds, naming the fix, when the tracking store cannot be used: a server that
    does not answer (MLflow itself would retry for minutes) or a database file that is not one."""
    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        except requests.RequestException as exc:
            raise UserError(
                f"The MLflow tracking server {redact(uri)} does not answer ({type(exc).__name__}): start it "
                "(see the README), or unset MLFLOW_TRACKING_URI to use mlflow.db in this directory."
            ) from None
    elif uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        header = b""
        if path.is_file():
            with path.open("rb") as handle:
                header = handle.read(16)
        if header and header != b"SQLite format 3\x00":
            raise UserError(
                f"{path} is not an SQLite database, so it cannot be the MLflow store: move it aside "
                "(a new one is created) or point MLFLOW_TRACKING_URI at the store you meant."
            )


def use_experiment(name: str = DEFAULT_EXPERIMENT) -> str:
    """Point MLflow at the tracking URI and experiment; return the experiment id.

    With the default SQLite store, artifacts go to ``mlartifacts/`` beside ``mlflow.db``;
    a tracking server chooses its own artifact store.
    """
    uri = tracking_uri()
    default_store = uri == _default_uri()
    mlflow.set_tracking_uri(uri)  # (this also exports MLFLOW_TRACKING_URI to subprocesses)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        location = Path(DEFAULT_ARTIFACT_DIR).resolve().as_uri() if default_store else None
        with suppress(mlflow.exceptions.MlflowException):  # lost a race with another process
            mlflow.create_experiment(name, artifact_location=location)
        experiment = mlflow.get_experiment_by_name(name)
    if experiment.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:  # else MLflow 3 opens on its GenAI pages
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
    mlflow.set_experiment(experiment_id=experiment.experiment_id)
    if (uri, experiment.experiment_id) not in _tidied:  # once a process: runs killed since the last command
        _tidied.add((uri, experiment.experiment_id))
        ownership.close_orphans(experiment.experiment_id)
    return experiment.experiment_id


_tidied: set[tuple[str, str]] = set()


def close_all_orphans() -> None:
    """``ownership.close_orphans`` in every experiment of the store."""
    mlflow.set_tracking_uri(tracking_uri())
    for experiment in mlflow.search_experiments():
        ownership.close_orphans(experiment.experiment_id)


def redact(value: Any) -> Any:
    """Drop credentials embedded in URLs (``s3://key:secret@host``) before anything is logged."""
    return _URL_CREDENTIALS.sub(r"\g<scheme>***@", value) if isinstance(value, str) else value


def git_state(cwd: str | Path = ".") -> tuple[str, bool]:
    """(commit, dirty) of the repository at ``cwd``; ("unknown", True) outside git."""
    try:
        commit = _git(cwd, "rev-parse", "HEAD")
        dirty = bool(_git(cwd, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True
    return commit, dirty


def _git(cwd: str | Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def register_once(name: str, run_id: str, source: str, tags: dict[str, str]) -> str:
    """Register ``source`` as a version of model ``name`` unless ``run_id`` already has one."""
    client = mlflow.MlflowClient()
    with suppress(mlflow.exceptions.MlflowException):  # exists already
        client.create_registered_model(name)
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        return existing[0].version
    return client.create_model_version(name, source, run_id=run_id, tags=tags).version


def log_metrics(
    run_id: str, metrics: dict[str, float], step: int = 0, client: mlflow.MlflowClient | None = None
) -> None:
    """All of ``metrics`` at ``step`` in one request, to run ``run_id`` (active or not)."""
    now = int(time.time() * 1000)
    batch = [mlflow.entities.Metric(key, float(value), now, step) for key, value in metrics.items()]
    (client or mlflow.MlflowClient()).log_batch(run_id, metrics=batch)
