"""Run identity: what makes two runs the same, the tags that say so, and how a stage finds the
run it may reuse or must resume.

A stage's run is identified by a *run key* (``run_key``): a hash of everything that decides its
result: the data version or the run it builds on, the parameters that shape it (settings
declared ``reporting`` beside the parameter are left out, so changing them reuses the trained
model) and its code (``components.code_identity``). Each stage says what its key is made of
(``flows.stage.Stage.key``).

Before a stage works it claims its key (``ReuseOrResume.claim``): a finished run with its key is
reused, a run with its key that crashed or was killed is reopened and resumed (its checkpoints
are keyed by its run id), otherwise a new run starts; a run still being written by another live
process is waited for (``components.ownership``), never written twice. Every run carries the contract's tags
(``stage_run``); a sweep records which runs answer for each factor in ``FactorEntry`` tags.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run, RunStatus

from components import ownership
from components.code_identity import code_hash, git_state
from components.contract import (
    TAG_AE_RUN,
    TAG_DATA_VERSION,
    TAG_FACTOR,
    TAG_GIT_COMMIT,
    TAG_GIT_DIRTY,
    TAG_MACHINE,
    TAG_PRECISION,
    TAG_PRECISION_RULE,
    TAG_RUN_KEY,
    TAG_STAGE,
)
from components.credentials import redact
from components.errors import UserError
from components.machine import describe as describe_machine
from components.precision import Precision
from components.store import RunGlance, check_run

# --- what a run's identity is made of --------------------------------------------------------


def run_key(kind: str, *parts: Any) -> str:
    """A short, stable identity of ``parts`` (JSON-able) for one kind of run."""
    blob = json.dumps([kind, *parts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def stage_code_hash(entries: tuple[str, ...]) -> str:
    """The code identity of a stage whose entry modules are ``entries`` (``components.code_identity``)."""
    return code_hash(*entries) if entries else ""


def data_build_key(source_fingerprint: str) -> str:
    """``data/`` is rebuilt when its source or the code that prepares it changes."""
    return run_key("data", source_fingerprint, code_hash("components.sources", "components.dataset"))


# --- opening, finding and reopening runs ---------------------------------------------------------

TRAINING_STAGES = ("autoencoder", "ldm")  # the runs that record system metrics (CPU, memory, GPU)


def log_dataset(version: str, remote: str | None, context: str) -> None:
    """The data version as the active run's input dataset (the MLflow UI's Dataset column):
    digest = DVC's md5 of ``data/``, source = the DVC remote it can be pulled from."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    where = remote or "data"
    where = where if "://" in where else str(Path(where).resolve())
    with warnings.catch_warnings():  # (a local path "can be interpreted in multiple ways": all local)
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(redact(where))
    mlflow.log_input(MetaDataset(source, name=f"data-{version[:8]}", digest=version[:36]), context=context)


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
    """An MLflow run with the contract's tags and the flattened, redacted ``params``, marked as
    this process's while it is open (``components.ownership``).

        ``resume_run_id`` reopens a run that crashed, so a retried stage keeps one run.
    """
    commit, dirty = git_state()
    contract_tags = {
        TAG_STAGE: stage,
        TAG_DATA_VERSION: data_version,
        TAG_GIT_COMMIT: commit,
        TAG_GIT_DIRTY: str(dirty).lower(),
        TAG_MACHINE: describe_machine(),
    }
    if factor is not None:
        contract_tags[TAG_FACTOR] = str(factor)
    with (
        mlflow.start_run(
            run_id=resume_run_id,
            run_name=None if resume_run_id else run_name,
            parent_run_id=parent_run_id,
            nested=parent_run_id is not None,
            tags={**contract_tags, **(tags or {})},
            log_system_metrics=stage in TRAINING_STAGES,  # CPU, memory, GPU over time, beside the loss
        ) as run,
        ownership.heartbeat(run.info.run_id),
    ):
        if resume_run_id is None:  # a resumed run keeps the params and input it was started with
            mlflow.log_params({key: redact(value) for key, value in params.items()})
            if data_version:
                log_dataset(data_version, params.get("data.remote"), context=stage)
        try:
            yield run
        except Exception:
            raise  # FAILED, as MLflow marks it
        except BaseException as stop:  # Ctrl-C, SIGTERM (Prefect raises it), exit: stopped, not failed
            ownership.still_mine(run.info.run_id)  # a run taken over is the other process's to close
            mlflow.set_tag(ownership.TAG_CLOSED_REASON, f"stopped by {type(stop).__name__}")
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
            raise


def latest_run(experiment_id: str, stage: str, *, finished: bool = True, **tags: str) -> Run | None:
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


@dataclass(frozen=True)
class ReuseOrResume:
    """What the store holds for one stage and run key: a finished run to reuse, a run that was
    interrupted to resume, or neither; ``start`` opens the run to work in."""

    stage: str
    key: str
    reusable: Run | None
    resumable: Run | None
    lock: ownership.KeyLock | None = field(default=None, compare=False, repr=False)  # held by ``claim``

    @classmethod
    def find(cls, experiment_id: str, stage: str, key: str, *, fresh: bool = False) -> ReuseOrResume:
        """``fresh``: ignore what is recorded and start a new run (``reproduce``)."""
        if fresh:
            return cls(stage, key, None, None)
        tag = {TAG_RUN_KEY: key}
        reusable = latest_run(experiment_id, stage, **tag)
        return cls(stage, key, reusable, latest_run(experiment_id, stage, finished=False, **tag))

    @classmethod
    @contextmanager
    def claim(
        cls,
        experiment_id: str,
        stage: str,
        key: str,
        *,
        fresh: bool = False,
        log: Callable[[str], None] = lambda message: None,
    ) -> Iterator[ReuseOrResume]:
        """``find``, with the key held until ``start`` has opened the run as this process's: no
        other process on this machine claims it meanwhile. While an unfinished run of the key
        has a live writer elsewhere, this waits for it to finish (then reuses it) or to stop
        (then resumes it): its process ended, or its heartbeat stood still for
        ``ownership.STALE_SECONDS`` (``ownership.Watch``)."""
        with ownership.key_lock(f"{stage}-{key}", log) as lock:
            watch, logged = ownership.Watch(), -ownership.WAIT_LOG_SECONDS
            while True:
                recorded = cls.find(experiment_id, stage, key, fresh=fresh)
                busy = recorded.resumable if recorded.reusable is None and recorded.resumable else None
                writer = watch.writer(busy) if busy else None
                if writer is None:
                    break
                if time.monotonic() - logged >= ownership.WAIT_LOG_SECONDS:
                    log(
                        f"{stage} run {busy.info.run_id} is being written by {writer.describe()} (no heartbeat for "
                        f"{watch.silent_for(busy):.0f} s); waiting for it to finish, or to stay silent for "
                        f"{ownership.STALE_SECONDS:.0f} s and then resuming it here"
                    )
                    logged = time.monotonic()
                time.sleep(2.0)
            yield replace(recorded, lock=lock)

    @contextmanager
    def start(
        self,
        *,
        data_version: str,
        params: dict[str, Any],
        run_name: str,
        factor: int | None = None,
        tags: dict[str, str] | None = None,
        parent_run_id: str | None = None,
        reopen: Run | None = None,
    ) -> Iterator[mlflow.ActiveRun]:
        """The stage's run: the interrupted one reopened (or ``reopen``), else a new one. Once
        it is open as this process's, the key's lock is let go: others see its writer."""
        resume = reopen or self.resumable
        with stage_run(
            self.stage,
            data_version=data_version,
            params=params,
            run_name=run_name,
            factor=factor,
            tags={TAG_RUN_KEY: self.key, **(tags or {})},
            parent_run_id=parent_run_id,
            resume_run_id=resume.info.run_id if resume else None,
        ) as run:
            if self.lock is not None:
                self.lock.release()
            yield run


def run_of_stage(run_id: str, stages: tuple[str, ...], command: str) -> Run:
    """The recorded run ``run_id``, which ``command`` needs to be of one of ``stages``;
    anything else is a ``UserError`` that says what to pass instead."""
    try:
        run = mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        check_run(run_id, RunGlance(exists=False), stages, command)
    stage = run.data.tags.get(TAG_STAGE)
    check_run(run_id, RunGlance(True, run.info.lifecycle_stage == "deleted", stage), stages, command)
    missing = [tag for tag in REQUIRED_TAGS.get(stage, ()) if tag not in run.data.tags]
    if missing:
        raise UserError(
            f"Run {run_id} lacks the tag{'s' * (len(missing) > 1)} {', '.join(missing)} that every {stage} run "
            "carries (removed by hand?): set it back in the MLflow UI or pass another run."
        )
    return run


# What a command reads from a run of each stage it accepts (``run_of_stage``).
REQUIRED_TAGS = {
    "autoencoder": (TAG_DATA_VERSION, TAG_FACTOR),
    "ldm": (TAG_DATA_VERSION, TAG_FACTOR),
}


def autoencoder_run_of(run: Run) -> str | None:
    """The autoencoder run an LDM or evaluate run used; None for a pixel-space model."""
    tag = run.data.tags.get(TAG_AE_RUN)
    return tag if tag and not tag.startswith("none") else None  # ("none (pixel space)": runs before TAG_FIRST_STAGE)


def precision_tags(precision: Precision) -> dict[str, str]:
    return {TAG_PRECISION: precision.value, TAG_PRECISION_RULE: precision.rule}


def recorded_precision(tags: dict[str, str]) -> Precision | None:
    """The precision a training run recorded: decided once, read by whatever resumes or uses it."""
    if TAG_PRECISION not in tags:
        return None
    return Precision(tags[TAG_PRECISION], tags.get(TAG_PRECISION_RULE, "recorded by the run"))


def seeded_name(name: str, seed: int) -> str:
    """A run name that tells a sweep's repeats apart in the UI: ``ldm-f8``, ``ldm-f8-seed1``."""
    return name if seed == 0 else f"{name}-seed{seed}"
