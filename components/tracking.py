"""MLflow plumbing: the experiment runs go to, how metrics reach them, orphans closed, models
registered once. (Where the store is and whether it can be used, read before MLflow loads:
``components.store``; what a run *is* and how it is found again: ``components.runs``; the
Lightning callbacks that report training: ``components.mlflow_callbacks``.)
"""

from __future__ import annotations

import time
from contextlib import suppress

import mlflow

from components import ownership
from components.store import DEFAULT_EXPERIMENT, default_uri, tracking_uri
from components.workspace import ARTIFACTS_DIR

EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def use_experiment(name: str = DEFAULT_EXPERIMENT) -> str:
    """Point MLflow at the tracking URI and experiment; return the experiment id.

    With the default SQLite store, artifacts go to ``mlartifacts/`` beside ``mlflow.db``;
    a tracking server chooses its own artifact store.
    """
    uri = tracking_uri()
    default_store = uri == default_uri()
    mlflow.set_tracking_uri(uri)  # (this also exports MLFLOW_TRACKING_URI to subprocesses)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        location = ARTIFACTS_DIR.resolve().as_uri() if default_store else None
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


def register_once(name: str, run_id: str, model_uri: str, tags: dict[str, str]) -> str:
    """Register the logged model ``model_uri`` as a version of ``name`` unless ``run_id``
    already has one (a resumed run registers once). The store has no register-if-absent, so
    two processes may both register one run: each then keeps the lowest version and deletes its
    own if it is not that one, and every process returns the same version."""
    client = mlflow.MlflowClient()
    existing = _versions_of(client, name, run_id)
    if existing:
        return existing[0]
    mine = mlflow.register_model(model_uri, name, tags=tags).version
    kept, *duplicates = _versions_of(client, name, run_id)
    if str(mine) in duplicates:
        client.delete_model_version(name, str(mine))
    return kept


def _versions_of(client: mlflow.MlflowClient, name: str, run_id: str) -> list[str]:
    """The versions of ``name`` registered from ``run_id``, lowest first."""
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return sorted((str(v.version) for v in found), key=int)


def point_aliases(name: str, run_by_alias: dict[str, str]) -> dict[str, str]:
    """Set each alias of model ``name`` to the version registered by its run; returns
    {alias: version} for the runs that have one (f=1's pixel-space LDM has none)."""
    client = mlflow.MlflowClient()
    pointed = {}
    for alias, run_id in run_by_alias.items():
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if versions:
            client.set_registered_model_alias(name, alias, versions[0].version)
            pointed[alias] = versions[0].version
    return pointed


def log_metrics(
    run_id: str, metrics: dict[str, float], step: int = 0, client: mlflow.MlflowClient | None = None
) -> None:
    """All of ``metrics`` at ``step`` in one request, to run ``run_id`` (active or not)."""
    now = int(time.time() * 1000)
    batch = [mlflow.entities.Metric(key, float(value), now, step) for key, value in metrics.items()]
    (client or mlflow.MlflowClient()).log_batch(run_id, metrics=batch)
