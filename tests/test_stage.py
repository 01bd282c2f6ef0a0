"""The stage abstraction (flows/stage.py): a stage declared in one place and run by the one runner,
on a real MLflow store and the session's Prefect API; and what each real stage's key is made of."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.entities import Run

from components.code_identity import import_closure
from components.first_stage import FirstStageRef
from components.presets import load_params
from flows.autoencoder import AutoencoderStage
from flows.evaluate import EvaluateStage
from flows.ldm import LDMStage
from flows.pipeline import STAGES
from flows.stage import DataVersion, Stage, run_stage

DATA = DataVersion("v1", "", {})


class Doubling(Stage):
    """A toy stage, as a new task's stage would be written: this class is all it takes."""

    name = "evaluate"  # (a contract stage name; a new kind would add its own)
    code = ("components.images",)
    sections = ("seed", "ae.lr")
    calls: list[str] = []
    fail_once = False

    def upstream(self) -> list[str]:
        return ["doubling", self.data.version]

    def prepare(self, resumed: Run | None) -> None:
        Doubling.calls.append(f"prepare resumed={resumed is not None}")

    def tags(self) -> dict[str, str]:
        return {"toy.lr": str(self.params.ae.lr)}

    def train(self, run_id: str, resuming: bool) -> None:
        Doubling.calls.append(f"train resuming={resuming}")
        if Doubling.fail_once:
            Doubling.fail_once = False
            raise RuntimeError("killed mid-training")
        mlflow.log_metric("double_lr", 2 * self.params.ae.lr)

    def publish(self, run_id: str) -> None:
        Doubling.calls.append("publish")


@pytest.fixture
def toy(mlflow_store):
    Doubling.calls, Doubling.fail_once = [], False
    return lambda *sets: Doubling(load_params(None, list(sets)), DATA)


def test_a_toy_stage_trains_publishes_and_carries_the_contracts_tags(toy):
    result = run_stage(toy("ae.lr=0.25"))
    assert not result.reused and Doubling.calls == ["prepare resumed=False", "train resuming=False", "publish"]
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["double_lr"] == 0.5
    tags = run.data.tags
    assert tags["latentlab.stage"] == "evaluate" and tags["latentlab.data_version"] == "v1"
    assert tags["toy.lr"] == "0.25" and "mlflow.source.git.commit" in tags and "latentlab.run_key" in tags
    assert run.data.params == {"seed": "0", "ae.lr": "0.25"}  # its sections, dotted


def test_a_toy_stage_is_reused_when_its_key_matches_and_rerun_when_it_does_not(toy):
    first = run_stage(toy())
    again = run_stage(toy("ae.log_every=3"))  # reporting only: same key
    assert again.reused and again.run_id == first.run_id
    other = run_stage(toy("ae.lr=0.5"))
    assert not other.reused and other.run_id != first.run_id


def test_a_toy_stage_that_crashed_resumes_into_the_same_run(toy):
    Doubling.fail_once = True
    with pytest.raises(RuntimeError, match="killed mid-training"):
        run_stage(toy())
    (crashed,) = mlflow.search_runs(output_format="list")
    assert crashed.info.status == "FAILED"
    Doubling.calls.clear()
    resumed = run_stage(toy())
    assert resumed.run_id == crashed.info.run_id and not resumed.reused
    assert Doubling.calls == ["prepare resumed=True", "train resuming=True", "publish"]
    assert mlflow.get_run(resumed.run_id).info.status == "FINISHED"


def test_fresh_ignores_a_finished_run(toy):
    first = run_stage(toy())
    assert run_stage(toy(), fresh=True).run_id != first.run_id


# --- what the real stages' keys are made of ---------------------------------------------------------


def no_extractor():
    raise AssertionError("a run key must not need the FID network")


def keys(stage: type[Stage], *sets: str, **inputs) -> str:
    data = inputs.pop("data", DATA)
    return stage(load_params(None, list(sets)), data, experiment="latentlab", extractor=no_extractor, **inputs).key()


AE = FirstStageRef("ae-run", 8)


@pytest.mark.parametrize(
    "setting", ["ae.log_every=7", "ae.image_every=7", "ae.checkpoint_every=7", "ae.accelerator=cpu"]
)
def test_reporting_settings_do_not_change_the_autoencoder_key(setting):
    assert keys(AutoencoderStage, setting) == keys(AutoencoderStage)


@pytest.mark.parametrize("setting", ["ae.lr=1e-3", "seed=1", "ae.regularizer=vq", "data.resolution=32"])
def test_what_shapes_the_autoencoder_changes_its_key(setting):
    assert keys(AutoencoderStage, setting) != keys(AutoencoderStage)


def test_another_data_version_changes_the_autoencoder_key():
    assert keys(AutoencoderStage, data=DataVersion("v2", "", {})) != keys(AutoencoderStage)


@pytest.mark.parametrize(
    "setting",
    [
        "ldm.budget_points=7",
        "ldm.budget_samples=9",
        "ldm.budget_sample_steps=7",
        "ldm.samples_per_class=7",
        "ldm.log_every=7",
        "ldm.image_every=7",
        "ldm.checkpoint_every=7",
        "ldm.accelerator=cpu",
        "ae.lr=1e-3",  # (the first stage's own key says what it was trained with)
    ],
)
def test_reporting_settings_do_not_change_the_ldm_key(setting):
    assert keys(LDMStage, setting, first=AE) == keys(LDMStage, first=AE)


@pytest.mark.parametrize("setting", ["ldm.lr=2e-4", "seed=1", "ldm.conditioning=text", "ldm.widths=[16, 32]"])
def test_what_shapes_the_ldm_changes_its_key(setting):
    assert keys(LDMStage, setting, first=AE) != keys(LDMStage, first=AE)


def test_pixel_space_is_a_first_stage_with_a_stable_identity():
    pixels = FirstStageRef.pixels("v1", 64)
    assert pixels == FirstStageRef.pixels("v1", 64) and pixels.autoencoder_run is None and pixels.factor == 1
    assert pixels.id != FirstStageRef.pixels("v2", 64).id != FirstStageRef.pixels("v1", 32).id
    assert keys(LDMStage, first=pixels) != keys(LDMStage, first=AE) and AE.autoencoder_run == "ae-run"


def test_each_stage_hashes_the_code_it_imports_and_not_the_others():
    ae, ldm = (set(import_closure(entry)) for stage in (AutoencoderStage, LDMStage) for entry in stage.code)
    assert {"components.first_stage", "components.losses", "components.training"} <= ae
    assert "components.diffusion" not in ae and "components.losses" not in ldm
    assert {"components.diffusion", "components.first_stage", "components.training"} <= ldm
    assert not {"components.progress", "components.errors", "components.workspace"} & (ae | ldm)  # RESULT_NEUTRAL


def test_the_registry_lists_each_stage_once_and_each_declares_what_it_is():
    assert len(set(STAGES)) == len(STAGES) and EvaluateStage in STAGES
    for stage in STAGES:
        assert stage.name in {"data", "autoencoder", "ldm", "evaluate", "sweep"}
        assert all(import_closure(entry) for entry in stage.code)
