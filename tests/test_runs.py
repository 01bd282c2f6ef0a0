"""Run identity (components/runs.py): run keys, finding a run to reuse or resume and the
contract's tags, on a real (SQLite) MLflow store."""

from __future__ import annotations

import mlflow
import pytest

from components import contract, runs

STAGE, KEY = "autoencoder", "0123456789abcdef0123"


def record(experiment_id: str, stage: str = STAGE, key: str = KEY, status: str = "FINISHED") -> str:
    """A run of ``stage`` with run key ``key`` that ended with ``status`` (RUNNING: never ended)."""
    client = mlflow.MlflowClient()
    run_id = client.create_run(experiment_id, tags={contract.TAG_STAGE: stage, contract.TAG_RUN_KEY: key}).info.run_id
    if status != "RUNNING":
        client.set_terminated(run_id, status=status)
    return run_id


def found(finding: runs.ReuseOrResume) -> tuple[str | None, str | None]:
    ids = (finding.reusable, finding.resumable)
    return tuple(run.info.run_id if run else None for run in ids)


# --- run keys --------------------------------------------------------------------------------------


def test_run_key_is_stable_for_equal_inputs():
    first = runs.run_key("ldm", "abc", 3, {"lr": 0.1, "widths": [16, 32]})
    assert first == runs.run_key("ldm", "abc", 3, {"widths": [16, 32], "lr": 0.1})  # dict order is no part


@pytest.mark.parametrize(
    "other",
    [
        ("ldm", "abd", 3, {"lr": 0.1, "widths": [16, 32]}),
        ("ldm", "abc", 4, {"lr": 0.1, "widths": [16, 32]}),
        ("ldm", "abc", 3, {"lr": 0.2, "widths": [16, 32]}),
        ("ldm", "abc", 3, {"lr": 0.1, "widths": [16, 64]}),
        ("ldm", "abc", 3, {"lr": 0.1, "widths": [16, 32]}, "more"),
        ("autoencoder", "abc", 3, {"lr": 0.1, "widths": [16, 32]}),
    ],
)
def test_run_key_differs_when_any_part_or_the_kind_differs(other):
    assert runs.run_key(*other) != runs.run_key("ldm", "abc", 3, {"lr": 0.1, "widths": [16, 32]})


# --- finding a run to reuse or resume ---------------------------------------------------------------


def test_a_finished_run_with_the_key_is_reusable(mlflow_store):
    finished = record(mlflow_store)
    assert found(runs.ReuseOrResume.find(mlflow_store, STAGE, KEY)) == (finished, None)


@pytest.mark.parametrize("status", ["FAILED", "RUNNING"])
def test_a_failed_or_running_run_with_the_key_is_resumable(mlflow_store, status):
    interrupted = record(mlflow_store, status=status)
    assert found(runs.ReuseOrResume.find(mlflow_store, STAGE, KEY)) == (None, interrupted)


def test_runs_of_another_stage_or_key_are_neither_reusable_nor_resumable(mlflow_store):
    record(mlflow_store, stage="ldm")
    record(mlflow_store, stage="ldm", status="FAILED")
    record(mlflow_store, key="another-key")
    record(mlflow_store, key="another-key", status="FAILED")
    assert found(runs.ReuseOrResume.find(mlflow_store, STAGE, KEY)) == (None, None)
    assert found(runs.ReuseOrResume.find(mlflow_store, "ldm", KEY))[0] is not None  # (they are there)


def test_fresh_ignores_what_is_recorded(mlflow_store):
    record(mlflow_store)
    record(mlflow_store, status="FAILED")
    finding = runs.ReuseOrResume.find(mlflow_store, STAGE, KEY, fresh=True)
    assert found(finding) == (None, None) and (finding.stage, finding.key) == (STAGE, KEY)


def test_start_opens_a_run_with_the_contract_tags_and_the_params(mlflow_store, tmp_path, monkeypatch, git):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    git(checkout, "init", "-q")
    git(checkout, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "x")
    monkeypatch.chdir(checkout)
    finding = runs.ReuseOrResume.find(mlflow_store, STAGE, KEY)
    params = {"ae.lr": 0.001, "data.remote": "s3://key:secret@host/bucket"}
    with finding.start(data_version="v1", params=params, run_name="ae-f4-kl", factor=4, tags={"extra": "yes"}) as run:
        run_id = run.info.run_id
    recorded = mlflow.get_run(run_id)
    tags = recorded.data.tags
    assert tags[contract.TAG_STAGE] == STAGE and tags[contract.TAG_RUN_KEY] == KEY
    assert tags[contract.TAG_DATA_VERSION] == "v1" and tags[contract.TAG_FACTOR] == "4" and tags["extra"] == "yes"
    assert tags[contract.TAG_GIT_COMMIT] == git(checkout, "rev-parse", "HEAD").strip()
    assert tags[contract.TAG_GIT_DIRTY] == "false"
    assert recorded.data.params == {"ae.lr": "0.001", "data.remote": "s3://***@host/bucket"}
    assert recorded.info.run_name == "ae-f4-kl" and recorded.info.status == "FINISHED"


def test_start_without_a_factor_sets_no_factor_tag(mlflow_store):
    with runs.ReuseOrResume.find(mlflow_store, STAGE, KEY).start(data_version="v1", params={}, run_name="r") as run:
        run_id = run.info.run_id
    assert contract.TAG_FACTOR not in mlflow.get_run(run_id).data.tags


def test_start_reopens_the_resumable_run_without_logging_params_again(mlflow_store):
    finding = runs.ReuseOrResume.find(mlflow_store, STAGE, KEY)
    with finding.start(data_version="v1", params={"ae.lr": 0.1}, run_name="first") as run:
        first = run.info.run_id
    mlflow.MlflowClient().set_terminated(first, status="FAILED")

    again = runs.ReuseOrResume.find(mlflow_store, STAGE, KEY)
    assert found(again) == (None, first)
    with again.start(data_version="v1", params={"ae.lr": 0.5, "ae.new": 1}, run_name="second") as run:
        assert run.info.run_id == first
    resumed = mlflow.get_run(first)
    assert resumed.data.params == {"ae.lr": "0.1"}
    assert resumed.info.run_name == "first" and resumed.info.status == "FINISHED"
    assert len(mlflow.search_runs(experiment_ids=[mlflow_store], output_format="list")) == 1


# --- which autoencoder a run used ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tag", "expected"), [("none (pixel space)", None), ("0a1b2c3d", "0a1b2c3d"), (None, None)], ids=str
)
def test_autoencoder_run_of_reads_the_tag_and_gives_nothing_for_pixel_space(mlflow_store, tag, expected):
    client = mlflow.MlflowClient()
    tags = {contract.TAG_STAGE: "ldm"} | ({contract.TAG_AE_RUN: tag} if tag is not None else {})
    run_id = client.create_run(mlflow_store, tags=tags).info.run_id
    assert runs.autoencoder_run_of(mlflow.get_run(run_id)) == expected


def test_a_deleted_run_or_one_missing_its_tags_is_refused_by_name(mlflow_store):
    client = mlflow.MlflowClient()
    tags = {contract.TAG_DATA_VERSION: "v1", contract.TAG_FACTOR: "8"}
    whole = record(mlflow_store, "ldm")
    for name, value in tags.items():
        client.set_tag(whole, name, value)
    assert runs.run_of_stage(whole, ("ldm",), "latentlab evaluate --run").info.run_id == whole

    stripped = record(mlflow_store, "ldm")
    client.set_tag(stripped, contract.TAG_FACTOR, "8")
    with pytest.raises(runs.UserError, match=r"lacks the tag latentlab.data_version that every ldm run"):
        runs.run_of_stage(stripped, ("ldm",), "latentlab evaluate --run")

    client.delete_run(whole)
    with pytest.raises(runs.UserError, match=f"Run {whole} was deleted: restore it"):
        runs.run_of_stage(whole, ("ldm",), "latentlab evaluate --run")
