"""Run ownership (components/ownership.py, ``ReuseOrResume.claim``): real processes, real
signals, one real SQLite MLflow store; no run ever has two writers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from components import ownership, store
from components.contract import TAG_RUN_KEY, TAG_STAGE
from components.runs import ReuseOrResume

REPO = Path(__file__).resolve().parents[1]
STAGE, KEY = "autoencoder", "feedfacefeedfacefeed"

# One stage's life in another process: claim the key, reuse a finished run or write one for
# ``seconds`` (printing its id first), as every flow does.
WORKER = textwrap.dedent(
    """
    import sys, time
    from components.runs import ReuseOrResume
    experiment_id, seconds = sys.argv[1], float(sys.argv[2])
    with ReuseOrResume.claim(experiment_id, "autoencoder", "feedfacefeedfacefeed") as recorded:
        if recorded.reusable is not None:
            print("reused", recorded.reusable.info.run_id, flush=True)
            sys.exit(0)
        with recorded.start(data_version="v1", params={"ae.factor": 8}, run_name="ae-f8") as run:
            print("started", run.info.run_id, flush=True)
            time.sleep(seconds)
        print("finished", run.info.run_id, flush=True)
    """
)


@pytest.fixture
def worker(mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Start WORKER processes on the test's store, in the test's working directory (so they share
    its lock files, as two commands in one project do)."""
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "PYTHONPATH": str(REPO)}
    started: list[subprocess.Popen] = []

    def start(seconds: float) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-c", WORKER, mlflow_store, str(seconds)], env=env, stdout=subprocess.PIPE, text=True
        )
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def runs_of_key(experiment_id: str) -> list[mlflow.entities.Run]:
    return mlflow.search_runs([experiment_id], f"tags.`{TAG_RUN_KEY}` = '{KEY}'", output_format="list")


def test_two_processes_claiming_one_key_write_one_run(worker, mlflow_store: str):
    first = worker(3.0)
    assert first.stdout.readline().split()[0] == "started"
    second = worker(0.0)  # started while the first is writing: waits, then reuses its run
    out_first, _ = first.communicate(timeout=60)
    out_second, _ = second.communicate(timeout=60)
    written = out_first.split()[-1]
    assert out_second.split() == ["reused", written]
    (run,) = runs_of_key(mlflow_store)
    assert run.info.status == "FINISHED"


def test_a_killed_writer_is_closed_as_killed_then_resumed_in_the_same_run(worker, mlflow_store: str):
    process = worker(600.0)
    _, run_id = process.stdout.readline().split()
    assert mlflow.get_run(run_id).info.status == "RUNNING"
    assert ownership.close_orphans(mlflow_store) == []  # its writer is alive: left alone
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert ownership.close_orphans(mlflow_store) == [run_id]
    closed = mlflow.get_run(run_id)
    assert closed.info.status == "KILLED"
    assert str(process.pid) in closed.data.tags[ownership.TAG_CLOSED_REASON]
    with ReuseOrResume.claim(mlflow_store, STAGE, KEY) as recorded:  # no wait: its owner is gone
        assert recorded.resumable.info.run_id == run_id
        with recorded.start(data_version="v1", params={}, run_name="ae-f8") as run:
            assert run.info.run_id == run_id
    resumed = mlflow.get_run(run_id)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags[ownership.TAG_OWNER] == str(ownership.Owner.me())
    assert len(runs_of_key(mlflow_store)) == 1


def unfinished_run(experiment_id: str, owner: str, heartbeat: float) -> str:
    client = mlflow.MlflowClient()
    tags = {TAG_STAGE: STAGE, TAG_RUN_KEY: KEY, ownership.TAG_OWNER: owner, ownership.TAG_HEARTBEAT: f"{heartbeat:.0f}"}
    return client.create_run(experiment_id, tags=tags).info.run_id


def test_a_writer_on_another_host_is_alive_while_its_heartbeat_is_fresh(mlflow_store: str):
    other = f"not-{socket.gethostname()} 4242 1700000000.0"
    fresh = mlflow.get_run(unfinished_run(mlflow_store, other, time.time()))
    stale = mlflow.get_run(unfinished_run(mlflow_store, other, time.time() - 2 * ownership.STALE_SECONDS))
    assert str(ownership.live_writer(fresh)) == other
    assert ownership.live_writer(stale) is None


def test_a_writer_on_this_host_is_alive_while_its_process_is(mlflow_store: str):
    here = socket.gethostname()
    me = ownership.Owner.me()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as sleeper:
        import psutil

        started = round(psutil.Process(sleeper.pid).create_time(), 2)
        alive = mlflow.get_run(unfinished_run(mlflow_store, f"{here} {sleeper.pid} {started}", 0))
        reused_pid = mlflow.get_run(unfinished_run(mlflow_store, f"{here} {sleeper.pid} {started - 50}", 0))
        assert ownership.live_writer(alive).pid == sleeper.pid  # no heartbeat needed on one host
        assert ownership.live_writer(reused_pid) is None  # same pid, another process
        sleeper.kill()
        sleeper.wait()
        assert ownership.live_writer(alive) is None
    mine = mlflow.get_run(unfinished_run(mlflow_store, str(me), 0))
    assert ownership.live_writer(mine) is None  # this process's own unfinished run: resumable


def test_claim_waits_for_a_live_writer_elsewhere_then_reuses_its_run(mlflow_store: str, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = f"not-{socket.gethostname()} 4242 1700000000.0"
    run_id = unfinished_run(mlflow_store, other, time.time())
    said: list[str] = []
    outcome: dict[str, str | None] = {}

    def claim() -> None:
        with ReuseOrResume.claim(mlflow_store, STAGE, KEY, log=said.append) as recorded:
            outcome["reused"] = recorded.reusable.info.run_id if recorded.reusable else None

    waiting = threading.Thread(target=claim)
    waiting.start()
    time.sleep(3)
    assert waiting.is_alive() and said and run_id in said[0]  # waiting, and saying for what
    mlflow.MlflowClient().set_terminated(run_id, "FINISHED")  # the other host finishes
    waiting.join(timeout=30)
    assert outcome == {"reused": run_id}


@pytest.mark.slow
def test_two_directories_against_one_mlflow_server_train_a_model_once(tmp_path, repo, ae_smoke):
    """Two projects (no shared lock files) on one real `mlflow server`: the second sees the
    first's autoencoder run being written by a live owner, waits, and reuses it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
        + ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"]
        + ["--artifacts-destination", (tmp_path / "server-artifacts").as_uri()],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        client = mlflow.MlflowClient(tracking_uri=uri)
        deadline = time.time() + 120
        while time.time() < deadline:  # /health with a short timeout: MLflow's client would back off for a minute
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        command = [
            str(Path(sys.executable).with_name("latentlab")),
            "train-ae",
            "--params",
            str(repo / "params/smoke.yaml"),
        ]
        for setting in [*ae_smoke, "ae.max_steps=300"]:
            command += ["--set", setting]
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()

        def start(folder: str) -> subprocess.Popen:
            out = subprocess.PIPE
            return subprocess.Popen(
                command, cwd=tmp_path / folder, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
            )

        def autoencoder_runs() -> list:
            try:
                return client.search_runs(
                    [e.experiment_id for e in client.search_experiments()], f"tags.`{TAG_STAGE}` = 'autoencoder'"
                )
            except Exception:  # noqa: BLE001 - the experiment may not exist yet
                return []

        first = start("a")
        while not autoencoder_runs() and time.time() < deadline + 300:
            time.sleep(0.5)
        second = start("b")  # the first's run is open now: the second must not write it or another
        outputs = [process.communicate(timeout=600)[0] for process in (first, second)]
        assert [first.returncode, second.returncode] == [0, 0], "\n".join(o[-2000:] for o in outputs)
        assert "litlogger" not in outputs[0] and "LeafSpec" not in outputs[0]  # third-party noise, silenced
        (run,) = autoencoder_runs()
        assert run.info.status == "FINISHED" and run.info.run_id in outputs[1]  # the second printed it: reused
        assert len(client.search_model_versions("name = 'autoencoder-f4-kl'")) == 1
        # the command line's glance at a run, through the server's REST API (no MLflow client)
        assert store.glance(run.info.run_id, uri) == store.RunGlance(True, False, "autoencoder")
        assert store.glance("0123456789abcdef0123456789abcdef", uri) == store.RunGlance(exists=False)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
