"""Reproduce a recorded autoencoder or LDM run from its data version, parameters and code.

The stage reads the run's data version from the project's ``data/`` when it holds exactly that
version, else from a DVC checkout under ``.latentlab/data-versions/`` (the user's ``data/`` is
never touched), and trains again, from scratch, as a child of a ``reproduce`` run that records
how far each metric moved and whether that is within ``reproduce.tolerance``.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

import mlflow
from prefect import flow

from components import workspace
from components.contract import (
    TAG_DATA_VERSION,
    TAG_FACTOR,
    TAG_GIT_COMMIT,
    TAG_REPRODUCED_RUN,
    TAG_REPRODUCED_STAGE,
    TAG_REPRODUCES,
    TAG_STAGE,
    TAG_WITHIN_TOLERANCE,
)
from components.dataset import read_manifest
from components.errors import UserError
from components.params import Params, params_from_run
from components.runs import run_of_stage, stage_run
from components.tracking import use_experiment
from flows.data import data_version_here
from flows.pipeline import autoencoder_flow, ldm_flow
from flows.stage import DataVersion

STAGES = ("autoencoder", "ldm")
CODE_PATHS = ("components", "flows")


@dataclass(frozen=True)
class Comparison:
    metric: str
    original: float
    reproduced: float

    @property
    def relative(self) -> float:
        return abs(self.reproduced - self.original) / max(abs(self.original), 1e-12)


@dataclass(frozen=True)
class Reproduction:
    run_id: str
    original_run_id: str
    new_run_id: str
    comparisons: list[Comparison]
    tolerance: float

    @property
    def within_tolerance(self) -> bool:
        return bool(self.comparisons) and all(c.relative <= self.tolerance for c in self.comparisons)


def check_code(commit: str, allow_code_change: bool) -> None:
    """The training code must be the recorded commit's, unless the user says otherwise."""
    if allow_code_change:
        return
    known = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True).returncode == 0
    if not known:
        raise UserError(
            f"The run was made by commit {commit}, which this repository does not have: fetch it, "
            "or pass --allow-code-change to reproduce with the code you have."
        )
    differs = subprocess.run(["git", "diff", "--quiet", commit, "--", *CODE_PATHS]).returncode != 0
    if differs:
        raise UserError(
            f"The code in {', '.join(CODE_PATHS)} differs from the run's commit {commit[:10]}: "
            f"`git checkout {commit[:10]}` first, or pass --allow-code-change to proceed anyway."
        )


def compare(original: mlflow.entities.Run, new_run_id: str, names: list[str]) -> list[Comparison]:
    new = mlflow.get_run(new_run_id).data.metrics
    old = original.data.metrics
    return [Comparison(name, old[name], new[name]) for name in names if name in old and name in new]


@flow(name="reproduce")
def reproduce_flow(
    params: Params, run_id: str, experiment: str = "latentlab", allow_code_change: bool = False
) -> Reproduction:
    """Train run ``run_id``'s stage again on its data version and compare the metrics."""
    use_experiment(experiment)
    original = run_of_stage(run_id, STAGES, "latentlab reproduce")
    stage, tags = original.data.tags[TAG_STAGE], original.data.tags
    check_code(tags.get(TAG_GIT_COMMIT, "unknown"), allow_code_change)
    if not set(params.reproduce.metrics) & set(original.data.metrics):
        raise UserError(
            f"Run {run_id} recorded none of reproduce.metrics ({', '.join(params.reproduce.metrics)}), so there is "
            f"nothing to compare: pick from what it has, e.g. --set 'reproduce.metrics=[{', '.join(sorted(original.data.metrics)[:3])}]'."
        )
    # The run's own eval section where it recorded one: the same feature extractor then scores
    # the reproduction (runs recorded before it was logged take the caller's).
    recorded_eval = any(name.startswith("eval.") for name in original.data.params)
    kept = ("sweep", "reproduce") if recorded_eval else ("eval", "sweep", "reproduce")
    run_params = params_from_run(original.data.params, keep=params, sections=kept)
    version = tags[TAG_DATA_VERSION]
    data_dir = data_version_here(run_params.data, version)
    data = DataVersion(version, "", read_manifest(data_dir))
    with (
        stage_run(
            "reproduce",
            data_version=version,
            params=run_params.flat(),
            run_name=f"reproduce-{original.info.run_name}",
            factor=int(tags[TAG_FACTOR]) if TAG_FACTOR in tags else None,
            tags={TAG_REPRODUCES: run_id, TAG_REPRODUCED_STAGE: stage},
        ) as run,
        workspace.reading_data(data_dir),
    ):
        if stage == "autoencoder":
            new_run_id = autoencoder_flow(run_params, experiment, run.info.run_id, data, fresh=True).autoencoder_run
        else:
            new_run_id = ldm_flow(run_params, experiment, run.info.run_id, data, fresh=True).run_id
        comparisons = compare(original, new_run_id, params.reproduce.metrics)
        result = Reproduction(run.info.run_id, run_id, new_run_id, comparisons, params.reproduce.tolerance)
        for c in comparisons:
            mlflow.log_metrics(
                {f"original/{c.metric}": c.original, c.metric: c.reproduced, f"rel_diff/{c.metric}": c.relative}
            )
        mlflow.set_tag(TAG_WITHIN_TOLERANCE, str(result.within_tolerance).lower())
        mlflow.set_tag(TAG_REPRODUCED_RUN, new_run_id)
    return result
