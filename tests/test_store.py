"""The command line's look at the tracking store before MLflow loads: a glance at a run in an
SQLite store, and the messages that refuse a run (the server path: test_ownership)."""

from __future__ import annotations

import mlflow
import pytest

from components import store
from components.errors import UserError
from components.runs import run_of_stage


def test_a_glance_at_an_sqlite_store_sees_what_mlflow_sees(mlflow_store, tmp_path):
    client = mlflow.MlflowClient()
    ldm = client.create_run(mlflow_store, tags={"latentlab.stage": "ldm"}).info.run_id
    plain = client.create_run(mlflow_store).info.run_id
    gone = client.create_run(mlflow_store, tags={"latentlab.stage": "ldm"}).info.run_id
    client.delete_run(gone)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert store.glance(ldm, uri) == store.RunGlance(True, False, "ldm")
    assert store.glance(plain, uri) == store.RunGlance(True, False, None)
    assert store.glance(gone, uri) == store.RunGlance(True, True, "ldm")
    assert store.glance("0123456789abcdef", uri) == store.RunGlance(exists=False)
    assert store.glance(ldm, f"sqlite:///{tmp_path / 'none.db'}") == store.RunGlance(exists=False)
    (tmp_path / "empty.db").touch()  # a database without MLflow's tables: MLflow decides
    assert store.glance(ldm, f"sqlite:///{tmp_path / 'empty.db'}") is None
    assert store.glance(ldm, "postgresql://user@host/db") is None


@pytest.mark.parametrize(
    ("seen", "said"),
    [
        (store.RunGlance(exists=False), "No MLflow run 'r1'"),
        (store.RunGlance(True, True, "ldm"), "was deleted: restore it"),
        (store.RunGlance(True, False, "sweep"), "is a sweep run: `latentlab evaluate` needs a run of stage ldm"),
        (store.RunGlance(True, False, None), "is a non-latentlab run"),
    ],
)
def test_a_run_of_the_wrong_kind_is_refused_saying_what_to_pass(seen, said):
    with pytest.raises(UserError, match=said.replace("(", r"\(")):
        store.check_run("r1", seen, ("ldm",), "latentlab evaluate")
    store.check_run("r1", store.RunGlance(True, False, "ldm"), ("ldm",), "latentlab evaluate")  # the right one


def test_mlflow_s_view_of_a_run_is_refused_with_the_same_messages(mlflow_store):
    run_id = mlflow.MlflowClient().create_run(mlflow_store, tags={"latentlab.stage": "sweep"}).info.run_id
    with pytest.raises(UserError, match="is a sweep run"):
        run_of_stage(run_id, ("ldm",), "latentlab evaluate")
    with pytest.raises(UserError, match="No MLflow run"):
        run_of_stage("0123456789abcdef", ("ldm",), "latentlab evaluate")
