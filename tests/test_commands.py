"""The server-side commands: `ui` serves this project's store on loopback; `serve` needs a server."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow

from components.tracking import use_experiment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_this_projects_runs_on_loopback(project):
    experiment_id = use_experiment("latentlab")
    with mlflow.start_run(run_name="visible"):
        mlflow.log_metric("fid", 1.5)
    port = free_port()
    exe = Path(sys.executable).with_name("latentlab")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the project's default store
    process = subprocess.Popen(
        [str(exe), "ui", "--port", str(port)],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        body = None
        deadline = time.time() + 120
        while time.time() < deadline and body is None:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search",
                    data=json.dumps({"experiment_ids": [experiment_id]}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                body = json.loads(urllib.request.urlopen(request, timeout=5).read())
            except OSError:
                time.sleep(1)
        assert body is not None, "the UI did not come up"
        assert [r["info"]["run_name"] for r in body["runs"]] == ["visible"]
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        assert listening and all("127.0.0.1:" in line for line in listening.splitlines())
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_serve_without_a_prefect_server_says_how_to_start_one(project, repo, cli):
    env_url = os.environ.pop("PREFECT_API_URL")
    try:
        done = cli(project, "serve", "--params", str(repo / "params/smoke.yaml"))
    finally:
        os.environ["PREFECT_API_URL"] = env_url
    assert done.returncode == 2
    message = " ".join(done.stderr.split())  # (rich wraps long lines)
    assert "prefect server start" in message and "PREFECT_API_URL" in message and "Traceback" not in message
