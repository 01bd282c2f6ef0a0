"""A sweep's record of which runs answer for each factor (``components.sweep_summary``), kept
in tags on a real MLflow run."""

from __future__ import annotations

import json

import mlflow

from components import contract
from components import sweep_summary as record
from tests.test_runs import record as record_run

# --- a sweep's record per factor --------------------------------------------------------------------


def test_factor_entries_round_trip_through_a_runs_tags(mlflow_store):
    sweep = record_run(mlflow_store, stage="sweep", status="RUNNING")
    entries = {
        4: record.FactorEntry({"autoencoder": "ae4", "ldm": "ldm4", "evaluate": "eval4"}, record.FINISHED),
        16: record.FactorEntry({"autoencoder": "ae16"}, "failed: CUDA out of memory"),
        1: record.FactorEntry(),
    }
    for factor, entry in entries.items():
        record.write_factor_entry(sweep, factor, entry)
    tags = mlflow.get_run(sweep).data.tags
    assert record.read_factor_entries(tags) == entries
    assert record.read_factor_entries(tags)[4].finished and not record.read_factor_entries(tags)[16].finished
    assert json.loads(tags[record.factor_tag(4)])["ldm"] == "ldm4"


def test_repeats_of_a_factor_have_their_own_tags_and_read_back_by_repeat(mlflow_store):
    sweep = record_run(mlflow_store, stage="sweep", status="RUNNING")
    first, second = record.FactorEntry({"ldm": "ldm8"}, record.FINISHED), record.FactorEntry({"ldm": "ldm8b"})
    record.write_factor_entry(sweep, 8, first)
    record.write_factor_entry(sweep, 8, second, repeat=2)
    record.write_factor_entry(sweep, 4, record.FactorEntry(), repeat=1)
    tags = mlflow.get_run(sweep).data.tags
    assert record.factor_tag(8, 2) == "latentlab.sweep.f8.r2" and record.factor_tag(8) == "latentlab.sweep.f8"
    assert record.read_sweep_entries(tags) == {(8, 0): first, (8, 2): second, (4, 1): record.FactorEntry()}
    assert record.read_factor_entries(tags) == {8: first}  # the first seed's, as before repeats existed
    assert record.read_factor_entries(tags, repeat=2) == {8: second}
    for malformed in ("8.r", "8.rx", "8.2", "8.r2.r3"):
        mlflow.MlflowClient().set_tag(sweep, contract.FACTOR_TAG_PREFIX + malformed, "{}")
    assert len(record.read_sweep_entries(mlflow.get_run(sweep).data.tags)) == 3


def test_a_damaged_factor_tag_reads_as_an_unfinished_entry_that_says_so(mlflow_store):
    sweep = record_run(mlflow_store, stage="sweep", status="RUNNING")
    client = mlflow.MlflowClient()
    client.set_tag(sweep, record.factor_tag(8), "{not json")
    client.set_tag(sweep, record.factor_tag(2), '["a", "list"]')
    entries = record.read_factor_entries(mlflow.get_run(sweep).data.tags)
    for factor in (8, 2):
        assert entries[factor].status.startswith("unreadable tag") and not entries[factor].finished
        assert entries[factor].runs == {} and entries[factor].run("ldm") == ""


def test_tags_other_than_factor_entries_are_ignored(mlflow_store):
    sweep = record_run(mlflow_store, stage="sweep", status="RUNNING")
    client = mlflow.MlflowClient()
    record.write_factor_entry(sweep, 4, record.FactorEntry(status="running"))
    others = (
        contract.TAG_BUDGET,
        contract.FACTOR_TAG_PREFIX,
        f"{contract.FACTOR_TAG_PREFIX}x",
        f"{contract.FACTOR_TAG_PREFIX}²",
        "latentlab.sweep.notes",
    )
    for name in others:
        client.set_tag(sweep, name, "{not json")
    assert record.read_factor_entries(mlflow.get_run(sweep).data.tags) == {4: record.FactorEntry(status="running")}


def test_any_stage_a_factor_runs_is_recorded_by_name_and_old_entries_read_as_stages(mlflow_store):
    sweep = record_run(mlflow_store, stage="sweep", status="RUNNING")
    entry = record.FactorEntry(status="running").with_run("autoencoder", "a").with_run("superres", "s")
    record.write_factor_entry(sweep, 8, entry)
    client = mlflow.MlflowClient()
    client.set_tag(
        sweep, record.factor_tag(4), json.dumps({"ae": "a4", "ldm": "l4", "evaluate": "", "status": "finished"})
    )
    entries = record.read_factor_entries(mlflow.get_run(sweep).data.tags)
    assert entries[8].runs == {"autoencoder": "a", "superres": "s"} and entries[8].run("superres") == "s"
    assert entries[4] == record.FactorEntry({"autoencoder": "a4", "ldm": "l4"}, record.FINISHED)
