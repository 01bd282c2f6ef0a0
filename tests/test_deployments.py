"""The platform on real servers on loopback: a Prefect server with a process work pool and real
workers, an MLflow server whose artifacts live in S3, a DVC remote on S3 (moto's standalone
S3 server). Nothing is mocked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import mlflow
import pytest

from components.contract import TAG_STAGE

BUCKET = "latentlab"
AWS = {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1"}


def _new_project(root: Path) -> Path:
    """A git+DVC checkout, as each machine would have."""
    root.mkdir(parents=True)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=root, check=True, env=env)
    return root


class S3Server:
    """moto's S3 server on loopback, which a test can stop and start again on the same port
    (its buckets live in this process, so they outlive a restart)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        self._server.start()
        host, self.port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{self.port}"

    def stop(self) -> None:
        self._server.stop()

    def start_again(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port)
        self._server.start()


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """An S3 server with one bucket; the AWS variables point boto3 at it."""
    server = S3Server()
    for key, value in AWS.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: S3Server) -> str:
    return s3_server.endpoint


@pytest.fixture
def mlflow_server(tmp_path: Path, s3: str, mlflow_server_at) -> Iterator[str]:
    """``mlflow server`` (SQLite backend) storing artifacts in the S3 bucket; clients upload
    through the server, so they need no S3 credentials of their own."""
    with mlflow_server_at(tmp_path / "server.db", f"s3://{BUCKET}/mlartifacts", {"MLFLOW_S3_ENDPOINT_URL": s3}) as uri:
        yield uri


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
    assert f"sweep/{name}" in done.stderr and {f"sweep/{name}", f"factor/{name}"} <= set(done.stdout.split())

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
        # All at once, with a short grace: how Prefect's workers stop is not ours to test, and a
        # worker that has run a flow ignored SIGTERM until the 60 s timeout (measured, each of two).
        for process in workers.values():
            os.killpg(process.pid, signal.SIGTERM)
        grace = time.time() + 10
        for process in workers.values():
            try:
                process.wait(timeout=max(0.1, grace - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)

    # Both factor workers ran a factor (each its own flow run), the coordinator none.
    ran = {w: {f for f in (1, 4) if f"f={f} LDM training started" in output[w]} for w in output}
    assert ran["coordinator"] == set() and sorted(ran["a"] | ran["b"]) == [1, 4]
    assert ran["a"] and ran["b"], ran
    assert not any("View run" in o for o in output.values())  # flow runs on workers print what the CLI does
    for factor_worker in ("a", "b"):  # the data version came from the DVC remote, not a build of its own
        assert "Reading data version" in output[factor_worker] and "Preparing" not in output[factor_worker]

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


@pytest.mark.slow
def test_an_s3_outage_costs_reports_and_a_retry_and_no_run_claims_artifacts_it_lacks(
    tmp_path, repo, ae_smoke, s3_server, mlflow_server
):
    """S3 goes down under the MLflow server while an autoencoder trains: the training's reports
    are skipped with a warning, publishing fails and is retried, S3 comes back, the retry
    uploads, and the finished run's artifacts are all in the bucket."""
    project = _new_project(tmp_path / "project")
    command = [
        str(Path(sys.executable).with_name("latentlab")),
        "train-ae",
        "--params",
        str(repo / "params/smoke.yaml"),
    ]
    for setting in [*ae_smoke, "ae.max_steps=60", "ae.image_every=3"]:
        command += ["--set", setting]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    process = subprocess.Popen(
        command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)

    def autoencoder_runs() -> list:
        try:
            experiments = [e.experiment_id for e in client.search_experiments()]
            return client.search_runs(experiments, f"tags.`{TAG_STAGE}` = 'autoencoder'")
        except Exception:  # noqa: BLE001 - the experiment may not exist yet
            return []

    deadline = time.time() + 300
    while not autoencoder_runs() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    s3_server.stop()  # under the MLflow server, while the autoencoder trains
    while not any("retrying" in line for line in lines) and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    s3_server.start_again()
    code = process.wait(timeout=300)
    assert code == 0, "".join(lines)[-4000:]
    reader.join(timeout=10)
    output = "".join(lines)
    assert "Could not log" in output and "did not answer" in output and "retrying" in output
    assert "Traceback" not in output

    (run,) = autoencoder_runs()
    assert run.info.status == "FINISHED"
    assert len(client.search_model_versions("name = 'autoencoder-f4-kl'")) == 1
    keys = {
        o["Key"]
        for page in boto3.client("s3", endpoint_url=s3_server.endpoint)
        .get_paginator("list_objects_v2")
        .paginate(Bucket=BUCKET)
        for o in page.get("Contents", [])
    }

    def files(path: str | None = None) -> list[str]:
        found = []
        for item in client.list_artifacts(run.info.run_id, path):
            found += files(item.path) if item.is_dir else [item.path]
        return found

    claimed = files()
    assert {"weights/autoencoder.safetensors", "diffusers/config.json"} <= set(claimed)
    missing = [path for path in claimed if not any(k.endswith(f"{run.info.run_id}/artifacts/{path}") for k in keys)]
    assert missing == []  # every artifact the run lists is an object in the bucket


def test_deploying_to_a_pool_of_another_type_keeps_the_process_settings_out_and_deploying_again_updates(
    smoke_params,
):
    """A Docker or Kubernetes pool's image decides where its flow runs start: ``working_dir`` is
    a process pool's job variable, given to process pools only (one is created when missing)."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.deployments import deploy

    other, missing = f"kube-{uuid.uuid4().hex[:6]}", f"new-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=other, type="kubernetes", base_job_template={}))
    names = deploy(smoke_params(), "latentlab", name=other, pool=other)
    deploy(smoke_params(), "latentlab", name=missing, pool=missing)
    deploy(smoke_params("seed=7"), "latentlab", name=missing, pool=missing)  # a second deploy updates in place
    with get_client(sync_client=True) as client:
        assert client.read_work_pool(missing).type == "process"
        on_other = [client.read_deployment_by_name(n) for n in names]
        on_process = client.read_deployment_by_name(f"sweep/{missing}")
    assert {d.work_pool_name for d in on_other} == {other} and all(not d.job_variables for d in on_other)
    assert on_process.job_variables == {"working_dir": "."} and on_process.parameters["params"]["seed"] == 7
