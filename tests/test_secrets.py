"""Credentials never leave the process: not in messages, tags, parameters, DVC's config or logs."""

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
