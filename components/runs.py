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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import mlflow
from mlflow.entities import Run, RunStatus

from components import ownership
from components.code_identity import code_hash
from components.errors import UserError
from components.precision import Precision
from components.store import TAG_STAGE, RunGlance, check_run, redact
from components.tracking import git_state, log_dataset

# --- tag names (the interface contract, and latentlab's own) -------------------------------------
# TAG_STAGE ("latentlab.stage") is components.store's: the command line reads it before MLflow loads.
TAG_DATA_VERSION = "latentlab.data_version"
TAG_FACTOR = "latentlab.factor"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_GIT_DIRTY = "latentlab.git_dirty"
TAG_RUN_KEY = "latentlab.run_key"
TAG_AE_RUN = "latentlab.ae_run_id"  # on LDM and evaluate runs of an autoencoder (not pixel space)
TAG_FIRST_STAGE = "latentlab.first_stage"  # on LDM and evaluate runs: ``FirstStageRef.id``
TAG_LDM_RUN = "latentlab.ldm_run_id"  # on evaluate runs
TAG_FID_EXTRACTOR = "latentlab.fid_extractor"
TAG_REFERENCE_SPLIT = "latentlab.reference_split"  # the real images FIDs were computed against
TAG_PERCEPTUAL = "latentlab.perceptual"
TAG_SEED = "latentlab.seed"  # on training runs
TAG_PRECISION = "latentlab.precision"  # on training runs: the precision it trained in
TAG_PRECISION_RULE = "latentlab.precision_rule"  # and which rule chose it (``components.precision``)
TAG_LATENT_SHAPE = "latentlab.latent_shape"
TAG_SMALL_SAMPLE = "latentlab.small_sample"
TAG_SMALL_SAMPLE_NOTE = "latentlab.small_sample_note"
TAG_ROLE = "latentlab.role"  # "feature-extractor" on the domain extractor's evaluate run
TAG_BUDGET = "latentlab.budget"  # on sweep runs
TAG_REPRODUCES = "latentlab.reproduces"
TAG_REPRODUCED_STAGE = "latentlab.reproduced_stage"
TAG_REPRODUCED_RUN = "latentlab.reproduced_run_id"
TAG_WITHIN_TOLERANCE = "latentlab.within_tolerance"
FACTOR_TAG_PREFIX = "latentlab.sweep.f"

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
        """``find``, with the key held for the block: no other process on this machine claims it
        meanwhile, and while an unfinished run of the key has a live writer elsewhere, this waits
        for it to finish (then reuses it) or to die (then resumes it)."""
        with ownership.key_lock(f"{stage}-{key}", log):
            logged = 0.0
            while True:
                recorded = cls.find(experiment_id, stage, key, fresh=fresh)
                busy = recorded.resumable if recorded.reusable is None and recorded.resumable else None
                writer = ownership.live_writer(busy) if busy else None
                if writer is None:
                    break
                if time.monotonic() - logged > ownership.WAIT_LOG_SECONDS:
                    log(f"{stage} run {busy.info.run_id} is being written by {writer}; waiting for it")
                    logged = time.monotonic()
                time.sleep(2.0)
            yield recorded

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
        """The stage's run: the interrupted one reopened (or ``reopen``), else a new one."""
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


# --- a sweep's record of which runs answer for each factor ---------------------------------------

FINISHED = "finished"


@dataclass(frozen=True)
class FactorEntry:
    """The runs that answer for one factor of a sweep, and how far it got."""

    ae: str = ""
    ldm: str = ""
    evaluate: str = ""
    status: str = "queued"  # queued | running | finished | "failed: <why>"

    @property
    def finished(self) -> bool:
        return self.status == FINISHED


def seeded_name(name: str, seed: int) -> str:
    """A run name that tells a sweep's repeats apart in the UI: ``ldm-f8``, ``ldm-f8-seed1``."""
    return name if seed == 0 else f"{name}-seed{seed}"


def factor_tag(factor: int, repeat: int = 0) -> str:
    """``latentlab.sweep.f8``; with ``sweep.seeds`` > 1, repeat r (seed = seed + r) is ``...f8.r<r>``."""
    return f"{FACTOR_TAG_PREFIX}{factor}" + (f".r{repeat}" if repeat else "")


def write_factor_entry(sweep_run_id: str, factor: int, entry: FactorEntry, repeat: int = 0) -> None:
    mlflow.MlflowClient().set_tag(sweep_run_id, factor_tag(factor, repeat), json.dumps(asdict(entry)))


def read_sweep_entries(tags: dict[str, str]) -> dict[tuple[int, int], FactorEntry]:
    """Every (factor, repeat) a sweep run recorded; a damaged tag reads as an unfinished entry
    that says so (a sweep then redoes it; a report shows it)."""
    entries = {}
    for name, value in tags.items():
        cell = _cell(name.removeprefix(FACTOR_TAG_PREFIX)) if name.startswith(FACTOR_TAG_PREFIX) else None
        if cell is None:
            continue
        try:
            fields = json.loads(value)
            entries[cell] = FactorEntry(
                **{k: str(fields.get(k) or "") for k in ("ae", "ldm", "evaluate")},
                status=str(fields.get("status") or "unknown"),
            )
        except (ValueError, TypeError, AttributeError):
            entries[cell] = FactorEntry(status=f"unreadable tag: {value!r}")
    return entries


def read_factor_entries(tags: dict[str, str], repeat: int = 0) -> dict[int, FactorEntry]:
    """Each factor's entry for one repeat (the first seed unless told)."""
    return {f: entry for (f, r), entry in read_sweep_entries(tags).items() if r == repeat}


def _cell(suffix: str) -> tuple[int, int] | None:
    """ "8" -> (8, 0), "8.r2" -> (8, 2); anything else is not a factor tag."""
    factor, _, repeat = suffix.partition(".r")
    digits = [factor, repeat or "0"]
    if not all(d.isascii() and d.isdigit() for d in digits):
        return None
    return int(factor), int(repeat or 0)
