"""The platform on real servers on loopback: a Prefect server with a process work pool and real
workers, an MLflow server whose artifacts live in S3, a DVC remote on S3 (moto's standalone
S3 server). Nothing is mocked."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import mlflow
import pytest

from components.runs import TAG_STAGE

BUCKET = "latentlab"
AWS = {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _new_project(root: Path) -> Path:
    """A git+DVC checkout, as each machine would have."""
    root.mkdir(parents=True)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=root, check=True, env=env)
    return root


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3 server on loopback with one bucket; the AWS variables point boto3 at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in AWS.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture
def mlflow_server(tmp_path: Path, s3: str) -> Iterator[str]:
    """``mlflow server`` (SQLite backend) storing artifacts in the S3 bucket; clients upload
    through the server, so they need no S3 credentials of their own."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
        + ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"]
        + ["--artifacts-destination", f"s3://{BUCKET}/mlartifacts"],
        env={**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    deadline = time.time() + 120
    while True:
        try:
            client.search_experiments()
            break
        except Exception:  # noqa: BLE001 - not up yet
            assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
            time.sleep(1)
    yield uri
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


@pytest.mark.slow
def test_a_deployed_sweep_runs_its_factors_on_two_workers_with_artifacts_and_data_in_s3(
    tmp_path, repo, tiny_sweep, s3, mlflow_server
):
    pool, name = f"pool-{uuid.uuid4().hex[:6]}", "nightly"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_server,
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # (default 10 s: poll faster, for the test's sake)
    }
    settings = [*tiny_sweep, f"data.remote=s3://{BUCKET}/dvc", f"data.remote_endpoint={s3}"]
    deploy = [str(Path(sys.executable).with_name("latentlab")), "deploy", "--params", str(repo / "params/smoke.yaml")]
    for setting in settings:
        deploy += ["--set", setting]
    elsewhere = tmp_path / "elsewhere"  # deploying needs no project: nothing runs there
    elsewhere.mkdir()
    done = subprocess.run(
        [*deploy, "--pool", pool, "--name", name], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"sweep/{name}" in done.stderr and f"factor/{name}" in done.stderr

    # Three machines, each its own checkout: one coordinates, two take one factor at a time.
    workers = {}
    logs = {}
    for worker, queue, limit in (
        ("coordinator", "sweeps", []),
        ("a", "factors", ["--limit", "1"]),
        ("b", "factors", ["--limit", "1"]),
    ):
        checkout = _new_project(tmp_path / worker)
        logs[worker] = tmp_path / f"{worker}.log"
        workers[worker] = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--work-queue", queue]
            + ["--name", worker, *limit],
            cwd=checkout,
            env=env,
            stdout=logs[worker].open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        from prefect.deployments import run_deployment

        sweep = run_deployment(f"sweep/{name}", timeout=900, poll_interval=2)
        output = {worker: log.read_text() for worker, log in logs.items()}
        assert sweep.state.is_completed(), f"{sweep.state}\n" + "\n".join(o[-3000:] for o in output.values())
    finally:
        for process in workers.values():
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)

    # Both factor workers ran a factor (each its own flow run), the coordinator none.
    ran = {w: {f for f in ("factor-f1-seed0", "factor-f4-seed0") if f"'{f}'" in output[w]} for w in output}
    assert ran["coordinator"] == set() and sorted(ran["a"] | ran["b"]) == ["factor-f1-seed0", "factor-f4-seed0"]
    assert ran["a"] and ran["b"], ran

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("latentlab").experiment_id
    runs = client.search_runs([experiment])
    by_name = {run.info.run_name: run for run in runs}
    (sweep_run,) = [run for run in runs if run.data.tags[TAG_STAGE] == "sweep"]
    assert {"ldm-f1", "ldm-f4", "eval-f1", "eval-f4", "ae-f4-kl"} <= set(by_name)
    assert all(run.info.status == "FINISHED" for run in runs)
    for child in ("ldm-f1", "ldm-f4", "eval-f1", "eval-f4"):
        assert by_name[child].data.tags["mlflow.parentRunId"] == sweep_run.info.run_id

    # Their artifacts are objects in the bucket, and so is the data version.
    s3_client = boto3.client("s3", endpoint_url=s3)
    keys = [
        o["Key"]
        for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        for o in page["Contents"]
    ]
    for ldm in ("ldm-f1", "ldm-f4"):
        assert any(k.endswith(f"{by_name[ldm].info.run_id}/artifacts/ldm/ldm.json") for k in keys), ldm
    version = sweep_run.data.tags["latentlab.data_version"]
    assert f"dvc/files/md5/{version[:2]}/{version[2:]}" in keys
