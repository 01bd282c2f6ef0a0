"""Run identity (components/runs.py): run keys, finding a run to reuse or resume, the
contract's tags, and a sweep's per-factor record, on a real (SQLite) MLflow store."""

from __future__ import annotations

import json

import mlflow
import pytest

from components import runs

STAGE, KEY = "autoencoder", "0123456789abcdef0123"


def record(experiment_id: str, stage: str = STAGE, key: str = KEY, status: str = "FINISHED") -> str:
    """A run of ``stage`` with run key ``key`` that ended with ``status`` (RUNNING: never ended)."""
    client = mlflow.MlflowClient()
    run_id = client.create_run(experiment_id, tags={runs.TAG_STAGE: stage, runs.TAG_RUN_KEY: key}).info.run_id
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
    assert tags[runs.TAG_STAGE] == STAGE and tags[runs.TAG_RUN_KEY] == KEY
    assert tags[runs.TAG_DATA_VERSION] == "v1" and tags[runs.TAG_FACTOR] == "4" and tags["extra"] == "yes"
    assert tags[runs.TAG_GIT_COMMIT] == git(checkout, "rev-parse", "HEAD").strip()
    assert tags[runs.TAG_GIT_DIRTY] == "false"
    assert recorded.data.params == {"ae.lr": "0.001", "data.remote": "s3://***@host/bucket"}
    assert recorded.info.run_name == "ae-f4-kl" and recorded.info.status == "FINISHED"


def test_start_without_a_factor_sets_no_factor_tag(mlflow_store):
    with runs.ReuseOrResume.find(mlflow_store, STAGE, KEY).start(data_version="v1", params={}, run_name="r") as run:
        run_id = run.info.run_id
    assert runs.TAG_FACTOR not in mlflow.get_run(run_id).data.tags


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


# --- a sweep's record per factor --------------------------------------------------------------------


def test_factor_entries_round_trip_through_a_runs_tags(mlflow_store):
    sweep = record(mlflow_store, stage="sweep", status="RUNNING")
    entries = {
        4: runs.FactorEntry(ae="ae4", ldm="ldm4", evaluate="eval4", status=runs.FINISHED),
        16: runs.FactorEntry(ae="ae16", status="failed: CUDA out of memory"),
        1: runs.FactorEntry(),
    }
    for factor, entry in entries.items():
        runs.write_factor_entry(sweep, factor, entry)
    tags = mlflow.get_run(sweep).data.tags
    assert runs.read_factor_entries(tags) == entries
    assert runs.read_factor_entries(tags)[4].finished and not runs.read_factor_entries(tags)[16].finished
    assert json.loads(tags[runs.factor_tag(4)])["ldm"] == "ldm4"


def test_repeats_of_a_factor_have_their_own_tags_and_read_back_by_repeat(mlflow_store):
    sweep = record(mlflow_store, stage="sweep", status="RUNNING")
    first, second = runs.FactorEntry(ldm="ldm8", status=runs.FINISHED), runs.FactorEntry(ldm="ldm8b")
    runs.write_factor_entry(sweep, 8, first)
    runs.write_factor_entry(sweep, 8, second, repeat=2)
    runs.write_factor_entry(sweep, 4, runs.FactorEntry(), repeat=1)
    tags = mlflow.get_run(sweep).data.tags
    assert runs.factor_tag(8, 2) == "latentlab.sweep.f8.r2" and runs.factor_tag(8) == "latentlab.sweep.f8"
    assert runs.read_sweep_entries(tags) == {(8, 0): first, (8, 2): second, (4, 1): runs.FactorEntry()}
    assert runs.read_factor_entries(tags) == {8: first}  # the first seed's, as before repeats existed
    assert runs.read_factor_entries(tags, repeat=2) == {8: second}
    for malformed in ("8.r", "8.rx", "8.2", "8.r2.r3"):
        mlflow.MlflowClient().set_tag(sweep, runs.FACTOR_TAG_PREFIX + malformed, "{}")
    assert len(runs.read_sweep_entries(mlflow.get_run(sweep).data.tags)) == 3


def test_a_damaged_factor_tag_reads_as_an_unfinished_entry_that_says_so(mlflow_store):
    sweep = record(mlflow_store, stage="sweep", status="RUNNING")
    client = mlflow.MlflowClient()
    client.set_tag(sweep, runs.factor_tag(8), "{not json")
    client.set_tag(sweep, runs.factor_tag(2), '["a", "list"]')
    entries = runs.read_factor_entries(mlflow.get_run(sweep).data.tags)
    for factor in (8, 2):
        assert entries[factor].status.startswith("unreadable tag") and not entries[factor].finished
        assert (entries[factor].ae, entries[factor].ldm, entries[factor].evaluate) == ("", "", "")


def test_tags_other_than_factor_entries_are_ignored(mlflow_store):
    sweep = record(mlflow_store, stage="sweep", status="RUNNING")
    client = mlflow.MlflowClient()
    runs.write_factor_entry(sweep, 4, runs.FactorEntry(status="running"))
    others = (
        runs.TAG_BUDGET,
        runs.FACTOR_TAG_PREFIX,
        f"{runs.FACTOR_TAG_PREFIX}x",
        f"{runs.FACTOR_TAG_PREFIX}²",
        "latentlab.sweep.notes",
    )
    for name in others:
        client.set_tag(sweep, name, "{not json")
    assert runs.read_factor_entries(mlflow.get_run(sweep).data.tags) == {4: runs.FactorEntry(status="running")}


# --- which autoencoder a run used ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tag", "expected"), [("none (pixel space)", None), ("0a1b2c3d", "0a1b2c3d"), (None, None)], ids=str
)
def test_autoencoder_run_of_reads_the_tag_and_gives_nothing_for_pixel_space(mlflow_store, tag, expected):
    client = mlflow.MlflowClient()
    tags = {runs.TAG_STAGE: "ldm"} | ({runs.TAG_AE_RUN: tag} if tag is not None else {})
    run_id = client.create_run(mlflow_store, tags=tags).info.run_id
    assert runs.autoencoder_run_of(mlflow.get_run(run_id)) == expected


def test_a_deleted_run_or_one_missing_its_tags_is_refused_by_name(mlflow_store):
    client = mlflow.MlflowClient()
    tags = {runs.TAG_DATA_VERSION: "v1", runs.TAG_FACTOR: "8"}
    whole = record(mlflow_store, "ldm")
    for name, value in tags.items():
        client.set_tag(whole, name, value)
    assert runs.run_of_stage(whole, ("ldm",), "latentlab evaluate --run").info.run_id == whole

    stripped = record(mlflow_store, "ldm")
    client.set_tag(stripped, runs.TAG_FACTOR, "8")
    with pytest.raises(runs.UserError, match=r"lacks the tag latentlab.data_version that every ldm run"):
        runs.run_of_stage(stripped, ("ldm",), "latentlab evaluate --run")

    client.delete_run(whole)
    with pytest.raises(runs.UserError, match=f"Run {whole} was deleted: restore it"):
        runs.run_of_stage(whole, ("ldm",), "latentlab evaluate --run")
