"""Credentials never leave the process (messages, tags, parameters, DVC config, logs), and what
the store hands back never becomes a path outside the project."""

from __future__ import annotations

import socket

import mlflow
import pytest

from components.errors import store_failure

SECRET = "s3cr3t-Pa55"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_dead_servers_failure_names_the_host_without_its_credentials(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    port = _closed_port()
    client = mlflow.MlflowClient(tracking_uri=f"http://admin:{SECRET}@127.0.0.1:{port}")
    with pytest.raises(Exception) as caught:  # noqa: PT011 (whatever MLflow raises: its text is the point)
        client.get_experiment("0")
    assert SECRET in str(caught.value), "MLflow's own message carries the password: the test would tell"
    message = store_failure(caught.value)
    assert message is not None and f"127.0.0.1:{port}" in message
    assert SECRET not in message and "admin" not in message


@pytest.mark.parametrize("command", [["runs"], ["ui"], ["train-ae", "--set", "ae.max_steps=1"]])
def test_commands_never_print_the_tracking_servers_password(tmp_path, cli, monkeypatch, command):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://admin:{SECRET}@127.0.0.1:{_closed_port()}")
    done = cli(tmp_path, *command)
    assert done.returncode in (2, 3), done.stderr
    assert SECRET not in done.stdout + done.stderr
    assert "127.0.0.1" in done.stdout + done.stderr  # still says which server


@pytest.mark.parametrize("key", ["data.remote=s3://AKIAEXAMPLE:{}@bucket/data", "data.remote_endpoint=http://u:{}@h:9"])
def test_credentials_in_parameters_are_refused_before_they_reach_dvc_mlflow_or_prefect(tmp_path, cli, key):
    done = cli(tmp_path, "data", "--set", key.format(SECRET))
    assert done.returncode == 2
    output = done.stdout + done.stderr
    assert "holds credentials" in output and "AWS_ACCESS_KEY_ID" in output and SECRET not in output
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".dvc").exists()


@pytest.mark.parametrize("edited", ["/tmp/elsewhere", "../../..", "0" * 31, "abc/../../x"])
def test_ids_from_the_store_never_become_paths_outside_the_project(edited):
    """A data-version tag or an LDM's first-stage run id can be edited by anyone with access to
    the store; as a folder name, "/tmp/elsewhere" would have run `dvc init` there and overwritten
    its data.dvc, and a relative climb would have loaded a first stage from any folder."""
    from components.artifacts import local_copy
    from components.dvc import check_version
    from components.errors import UserError

    with pytest.raises(UserError, match="is not a data version"):
        check_version(edited)
    with pytest.raises(UserError, match="is not an MLflow run id"):
        local_copy(edited, "first_stage")
    assert check_version("0123456789abcdef" * 2 + ".dir")
