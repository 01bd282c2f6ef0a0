"""MLflow helpers: where runs go, and the tags every run carries (the interface contract).

Flows open runs only through ``stage_run`` so no flow repeats the tagging.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import mlflow

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlartifacts"
DEFAULT_EXPERIMENT = "latentlab"

TAG_STAGE = "latentlab.stage"
TAG_DATA_VERSION = "latentlab.data_version"
TAG_FACTOR = "latentlab.factor"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_GIT_DIRTY = "latentlab.git_dirty"

_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else ``mlflow.db`` in the working directory (made absolute so a
    later change of directory cannot point the same process at another database)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or _default_uri()


def _default_uri() -> str:
    return f"sqlite:///{Path(DEFAULT_DB).resolve()}"


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
    mlflow.set_experiment(experiment_id=experiment.experiment_id)
    return experiment.experiment_id


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


def code_hash(modules: tuple[str, ...]) -> str:
    """sha256 of these ``components/`` modules: part of a run's identity, so changed code retrains."""
    here = Path(__file__).parent
    return hashlib.sha256(b"".join((here / name).read_bytes() for name in modules)).hexdigest()


def register_once(name: str, run_id: str, source: str, tags: dict[str, str]) -> str:
    """Register ``source`` as a version of model ``name`` unless ``run_id`` already has one."""
    client = mlflow.MlflowClient()
    with suppress(mlflow.exceptions.MlflowException):  # exists already
        client.create_registered_model(name)
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        return existing[0].version
    return client.create_model_version(name, source, run_id=run_id, tags=tags).version


@contextmanager
def stage_run(
    stage: str,
    *,
    data_version: str,
    params: dict[str, Any],
    run_name: str | None = None,
    factor: int | None = None,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run with the contract's tags and the flattened, redacted ``params``.

    ``resume_run_id`` reopens a run that crashed, so a retried stage keeps one run.
    """
    commit, dirty = git_state()
    contract_tags = {
        TAG_STAGE: stage,
        TAG_DATA_VERSION: data_version,
        TAG_GIT_COMMIT: commit,
        TAG_GIT_DIRTY: str(dirty).lower(),
    }
    if factor is not None:
        contract_tags[TAG_FACTOR] = str(factor)
    with mlflow.start_run(
        run_id=resume_run_id,
        run_name=None if resume_run_id else run_name,
        parent_run_id=parent_run_id,
        nested=parent_run_id is not None,
        tags={**contract_tags, **(tags or {})},
    ) as run:
        if resume_run_id is None:  # a resumed run keeps the params it was started with
            mlflow.log_params({key: redact(value) for key, value in params.items()})
        yield run


def latest_run(experiment_id: str, stage: str, *, finished: bool = True, **tags: str) -> mlflow.entities.Run | None:
    """The newest run of ``stage`` whose tags all match: a finished one, or (``finished=False``)
    one that started but never finished because it crashed or was killed."""
    clauses = [f"tags.`{TAG_STAGE}` = '{stage}'", f"attributes.status {'=' if finished else '!='} 'FINISHED'"]
    clauses += [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=" and ".join(clauses),
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0] if runs else None


def run_of_stage(run_id: str, stages: tuple[str, ...], command: str) -> mlflow.entities.Run:
    """The recorded run ``run_id``, which ``command`` needs to be of one of ``stages``;
    anything else is a ``UserError`` that says what to pass instead."""
    from components.errors import UserError

    try:
        run = mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise UserError(
            f"No MLflow run {run_id!r} in {mlflow.get_tracking_uri()}: `{command}` needs the id of "
            f"a run of stage {' or '.join(stages)} (see `latentlab ui`), or MLFLOW_TRACKING_URI set to the store that has it."
        ) from None
    stage = run.data.tags.get(TAG_STAGE)
    if stage not in stages:
        raise UserError(
            f"Run {run_id} is a {stage or 'non-latentlab'} run: `{command}` needs a run of stage {' or '.join(stages)}."
        )
    return run
