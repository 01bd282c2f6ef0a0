"""The server-side commands: `ui` serves this project's store on loopback; `serve` and `deploy` need a server."""

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
import pytest

from components.tracking import use_experiment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listeners(port: int) -> str:
    return subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout


def test_ui_serves_this_projects_runs_on_loopback(project, cli):
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
        listening = listeners(port)
        assert listening and all("127.0.0.1:" in line for line in listening.splitlines())

        (project / "params").mkdir(exist_ok=True)
        (project / "params/default.yaml").write_text("ae: {factor: 3}\n")  # a broken preset: `ui` reads none
        second = cli(project, "ui", "--port", str(port))  # the port is taken: say so, exit non-zero
        assert second.returncode == 2 and "pass another --port" in " ".join(second.stderr.split())

        process.send_signal(signal.SIGTERM)  # to `ui` alone: it must stop its server too
        assert process.wait(timeout=30) == 0
        deadline = time.time() + 15
        while listeners(port) and time.time() < deadline:
            time.sleep(0.5)
        assert not listeners(port), "the MLflow server outlived `latentlab ui`"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


def test_serve_creates_the_deployment_deploy_names_and_stops_on_ctrl_c(project, repo):
    from prefect import get_client

    name = f"served-{os.getpid()}"
    command = [str(Path(sys.executable).with_name("latentlab")), "serve", "--name", name, "--cron", "0 3 * * *"]
    command += ["--params", str(repo / "params/smoke.yaml")]
    server = subprocess.Popen(command, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, found = time.time() + 90, None
        while found is None and server.poll() is None and time.time() < deadline:
            with get_client(sync_client=True) as client:
                found = next((d for d in client.read_deployments() if d.name == name), None)
            time.sleep(0.5)
        assert found is not None, server.stderr.read() if server.poll() is not None else "no deployment"
        assert (
            found.parameters["fail_on_regression"] is False and found.parameters["params"]["data"]["resolution"] == 32
        )
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=60)  # (within SERVE_STOP_GRACE_S, even where Prefect misses it)
    assert out.split() == [f"sweep/{name}"] and "Traceback" not in err


def test_a_ctrl_c_that_the_serving_code_swallows_still_ends_serve_within_its_grace():
    """What Prefect's runner does when a Ctrl-C lands while it starts, reduced to its essence."""
    code = (  # "up" is printed inside the loop that swallows: a Ctrl-C that lands while it prints is swallowed too
        "import time\nfrom flows.cli import _stop_within\n_stop_within(1.0)\nup = False\n"
        "while True:\n    try:\n        if not up:\n            print('up', flush=True)\n            up = True\n"
        "        time.sleep(0.1)\n    except KeyboardInterrupt:\n        pass\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "up\n"
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=20) == 130


@pytest.mark.parametrize("command", ["serve", "deploy"])
def test_scheduling_without_a_prefect_server_says_how_to_start_one(project, repo, cli, command):
    env_url = os.environ.pop("PREFECT_API_URL")
    try:
        done = cli(project, command, "--params", str(repo / "params/smoke.yaml"))
    finally:
        os.environ["PREFECT_API_URL"] = env_url
    assert done.returncode == 2
    message = " ".join(done.stderr.split())  # (rich wraps long lines)
    assert f"{command} needs a Prefect server" in message and "prefect server start" in message
    assert "PREFECT_API_URL" in message and "Traceback" not in message


def test_an_unusable_tracking_store_fails_at_once_naming_the_fix(project, repo, cli, monkeypatch):
    garbage = b"not a database\n" * 100
    (project / "mlflow.db").write_bytes(garbage)
    done = cli(project, "train-ae", "--params", str(repo / "params/smoke.yaml"))
    message = " ".join(done.stderr.split())
    assert done.returncode == 3 and "is not an SQLite database" in message and "move it aside" in message
    assert "Traceback" not in done.stderr
    assert (project / "mlflow.db").read_bytes() == garbage  # nothing written into it

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nobody listens
    started = time.monotonic()
    done = cli(project, "sweep", "--params", str(repo / "params/smoke.yaml"))
    message = " ".join(done.stderr.split())
    assert done.returncode == 3 and "does not answer" in message and "Traceback" not in done.stderr
    assert time.monotonic() - started < 60  # not MLflow's minutes of retries


def test_a_prefect_server_that_does_not_answer_is_infrastructure_exit_3(project, repo, cli, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")  # nobody listens
    for command in ("sweep", "deploy"):
        done = cli(project, command, "--params", str(repo / "params/smoke.yaml"))
        message = " ".join(done.stderr.split())
        assert done.returncode == 3 and "The Prefect server" in message and "does not answer" in message, message
        assert "Traceback" not in done.stderr
    assert not (project / "mlflow.db").exists()  # nothing started


def test_run_ids_are_given_with_run_everywhere_and_options_act_where_shown(project, repo, cli):
    smoke = str(repo / "params/smoke.yaml")
    for command in ("evaluate", "report", "reproduce"):
        done = cli(project, command, "--params", smoke, "--run", "0123456789abcdef")
        assert done.returncode == 2 and "No MLflow run" in " ".join(done.stderr.split()), (command, done.stderr)
    old_form = cli(project, "reproduce", "--params", smoke, "0123456789abcdef")  # the positional still works
    assert old_form.returncode == 2 and "No MLflow run" in " ".join(old_form.stderr.split())
    bare = cli(project, "reproduce")
    assert bare.returncode == 2 and "--run RUN_ID" in bare.stderr
    # --params/--set are shown where they act; elsewhere accepted (DESIGN.md) and ignored with a note
    report_help = cli(project, "report", "--help").stdout
    assert "--params" not in report_help and "exit codes:" in report_help and "stdout:" in report_help
    assert "--params" in cli(project, "sweep", "--help").stdout
    listed = cli(project, "runs", "--params", "no-such-file.yaml")
    assert listed.returncode == 0 and "do not act on this command; ignored" in listed.stderr
    assert "No runs in experiment 'latentlab' yet" in listed.stderr


def test_a_missing_folder_or_unknown_run_is_reported_before_any_flow_starts(project, repo, cli):
    smoke = str(repo / "params/smoke.yaml")
    missing = cli(project, "sweep", "--params", smoke, "--set", "data.source=folder", "--set", "data.path=/nowhere")
    unknown = cli(project, "evaluate", "--params", smoke, "--run", "0123456789abcdef")
    for done, said in ((missing, "is not a directory"), (unknown, "No MLflow run")):
        message = " ".join(done.stderr.split())
        assert done.returncode == 2 and said in message and "Traceback" not in done.stderr
        assert "Beginning flow run" not in done.stdout + done.stderr  # found before Prefect was started
