"""A stage, declared once, and the one runner that runs every stage.

A stage is one kind of MLflow run (data, extractor, autoencoder, ldm, evaluate, sweep): a
subclass of ``Stage`` that says what it is (its ``name``, the ``code`` whose import closure is
its code identity, the params ``sections`` that shape its result, its upstream runs) and what it
does (``prepare`` before its run opens, ``train`` and ``publish`` inside it). ``run_stage`` does
for every stage what each flow used to repeat: claim the run key, reuse a finished run or resume
an interrupted one, open the run with the contract's tags, train, publish. Stages never import
each other: a flow composes them by handing one stage's ``StageRun`` to the next.

Adding a stage: its own module with a ``Stage`` subclass, its params section, and a line in the
registry (``flows.pipeline.STAGES``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import mlflow
from mlflow.entities import Run
from prefect import task
from prefect.cache_policies import NO_CACHE

from components import progress
from components.contract import TAG_STAGE
from components.params import Params
from components.runs import ReuseOrResume, run_key, seeded_name, stage_code_hash
from components.tracking import use_experiment
from flows.retries import STORE_RETRIES

log = logging.getLogger("latentlab")


@dataclass(frozen=True)
class DataVersion:
    """The dataset every stage reads: its DVC version (the md5 in ``data.dvc``), the ``data`` run
    that records it, and its manifest (classes, counts, files)."""

    version: str
    run_id: str
    manifest: dict


@dataclass(frozen=True)
class StageRun:
    """A stage's finished run, as a downstream stage reads it: id, tags and metrics."""

    stage: str
    run_id: str
    reused: bool
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, run: Run, reused: bool) -> StageRun:
        return cls(run.data.tags.get(TAG_STAGE, ""), run.info.run_id, reused, run.data.tags, run.data.metrics)


class Stage:
    """One kind of run. Subclasses set the class attributes and override the hooks they need;
    an instance is one run's worth of inputs (parameters, data version, upstream runs)."""

    name: ClassVar[str]  # the run's ``latentlab.stage`` tag
    code: ClassVar[tuple[str, ...]] = ()  # entry modules: their import closure is the stage's code
    sections: ClassVar[tuple[str, ...]] = ()  # params sections (or "section.key") that shape the result
    logged: ClassVar[tuple[str, ...] | None] = None  # params sections logged on the run (None: ``sections``)
    title: ClassVar[str] = ""  # how progress names its phases ("autoencoder"); default: ``name``
    orchestrates: ClassVar[bool] = False  # its work runs other stages (the sweep): no phase or task of its own

    def __init__(self, params: Params, data: DataVersion, experiment: str = "latentlab"):
        self.params, self.data, self.experiment = params, data, experiment

    # --- identity -----------------------------------------------------------------------------
    def upstream(self) -> list[Any]:
        """What the result is built on besides parameters and code (runs, versions): in the key."""
        return [self.data.version]

    def key(self) -> str:
        """The run key: upstream, the shaping parameters, and the code (``components.runs``)."""
        shaping = {section: self.params.shaping(section) for section in self.sections}
        return run_key(self.name, self.upstream(), shaping, stage_code_hash(self.code))

    def factor(self) -> int | None:
        """The ``latentlab.factor`` tag, for per-factor runs."""
        return None

    def run_name(self) -> str:
        return seeded_name(self.name, self.params.seed)

    def logged_params(self) -> dict[str, Any]:
        """The params logged on the run, with dotted names (``ae.factor``)."""
        names = self.sections if self.logged is None else self.logged
        return {k: v for k, v in self.params.flat().items() if any(k == n or k.startswith(f"{n}.") for n in names)}

    # --- work ---------------------------------------------------------------------------------
    def prepare(self, resumed: Run | None) -> None:
        """Load and check what the run needs, before it opens (a bad input opens no run);
        ``resumed``: the interrupted run being reopened (what it recorded stands)."""

    def tags(self) -> dict[str, str]:
        """Tags the run starts with, beyond the contract's (known after ``prepare``)."""
        return {}

    def train(self, run_id: str, resuming: bool) -> None:
        """The stage's work inside its open run; ``resuming``: the run was interrupted before."""

    def publish(self, run_id: str) -> None:
        """What the run leaves for others: metrics, artifacts, registered models."""

    def complete(self, run: Run) -> bool:
        """Whether a finished run of this key answers for this stage; False reopens it."""
        return True

    def reuse(self, run: Run) -> None:
        """Called when a finished run is reused (fetch what this machine lacks, say so)."""


def run_stage(stage: Stage, *, parent_run_id: str | None = None, fresh: bool = False) -> StageRun:
    """Claim the stage's key; reuse a finished run, else resume an interrupted one or start a new
    one, train and publish in it. ``fresh``: ignore what is recorded (``reproduce``)."""
    title = stage.title or stage.name
    experiment_id = use_experiment(stage.experiment)
    with ReuseOrResume.claim(experiment_id, stage.name, stage.key(), fresh=fresh, log=log.info) as recorded:
        finished = recorded.reusable
        if finished is not None and stage.complete(finished):
            log.info("Reusing finished %s run %s", title, finished.info.run_id)
            stage.reuse(finished)
            return StageRun.of(finished, reused=True)
        reopen = recorded.resumable or finished
        if reopen is not None:
            log.info("Resuming interrupted %s run %s", title, reopen.info.run_id)
        stage.prepare(reopen)
        with recorded.start(
            data_version=stage.data.version,
            params=stage.logged_params(),
            run_name=stage.run_name(),
            factor=stage.factor(),
            tags=stage.tags(),
            parent_run_id=parent_run_id,
            reopen=reopen,
        ) as run:
            run_id = run.info.run_id
            if stage.orchestrates:
                stage.train(run_id, reopen is not None)
                stage.publish(run_id)
            else:
                with progress.phase(f"{title} training"):
                    _train(stage, run_id, reopen is not None)
                with progress.phase(f"{title} publishing"):
                    _publish(stage, run_id)
    return StageRun.of(mlflow.get_run(run_id), reused=False)


# Prefect tasks, so each step shows in the flow run and a store blip retries it (``flows.retries``):
# training resumes from its checkpoint, publishing uploads again into the same run.
@task(cache_policy=NO_CACHE, task_run_name="{stage.name}-train", **STORE_RETRIES)
def _train(stage: Stage, run_id: str, resuming: bool) -> None:
    stage.train(run_id, resuming)


@task(cache_policy=NO_CACHE, task_run_name="{stage.name}-publish", **STORE_RETRIES)
def _publish(stage: Stage, run_id: str) -> None:
    stage.publish(run_id)
