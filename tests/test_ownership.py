"""Run ownership (components/ownership.py, ``ReuseOrResume.claim``): real processes, real
signals, one real SQLite MLflow store; no run ever has two writers."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
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
    from components import ownership
    experiment_id, seconds = sys.argv[1], float(sys.argv[2])
    ownership.HEARTBEAT_SECONDS = float(sys.argv[3])
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

    def start(seconds: float, beat: float = ownership.HEARTBEAT_SECONDS) -> subprocess.Popen:
        command = [sys.executable, "-c", WORKER, mlflow_store, str(seconds), str(beat)]
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


ELSEWHERE = f"{socket.gethostname()} 0123456789ab 4242 1700000000.0"  # our hostname, another machine


def test_a_writer_elsewhere_is_alive_while_its_heartbeat_moves_whatever_its_clock_says(mlflow_store, monkeypatch):
    """Liveness never compares clocks: a beat stamped an hour in the past (or future) that keeps
    changing is a live writer; one that stands still for STALE_SECONDS of ours is gone."""
    monkeypatch.setattr(ownership, "STALE_SECONDS", 1.5)
    client = mlflow.MlflowClient()
    skewed = unfinished_run(mlflow_store, ELSEWHERE, time.time() - 3600)
    watch = ownership.Watch()
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:  # the other machine beats, with its clock an hour behind
        assert str(watch.writer(mlflow.get_run(skewed))) == ELSEWHERE
        client.set_tag(skewed, ownership.TAG_HEARTBEAT, f"{time.time() - 3600 + time.monotonic():.3f}")
        time.sleep(0.3)
    assert watch.writer(mlflow.get_run(skewed)) is not None
    time.sleep(1.7)  # it stops beating
    assert watch.writer(mlflow.get_run(skewed)) is None
    ahead = mlflow.get_run(unfinished_run(mlflow_store, ELSEWHERE, time.time() + 3600))
    assert ownership.Watch().writer(ahead) is not None  # a clock ahead is not a live-forever pass either
    assert ownership.close_orphans(mlflow_store) == []  # one look cannot tell: left to its stage


def test_a_machine_with_this_hostname_is_not_this_machine(mlflow_store: str):
    """Two machines with one hostname: the other's live run, whose pid means nothing here, is not
    closed as an orphan (by hostname alone it was), nor is one recorded in the older format."""
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as sleeper:
        twin = f"{socket.gethostname()} 0123456789ab {sleeper.pid} 1700000000.0"  # a pid that runs here too
        legacy = f"{socket.gethostname()} 999999 1700000000.0"  # host pid started, no machine id
        kept = [unfinished_run(mlflow_store, owner, time.time()) for owner in (twin, legacy)]
        assert ownership.close_orphans(mlflow_store) == []
        assert [mlflow.get_run(run_id).info.status for run_id in kept] == ["RUNNING", "RUNNING"]
        sleeper.kill()


def test_a_writer_on_this_machine_is_alive_while_its_process_is(mlflow_store: str):
    me = ownership.Owner.me()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as sleeper:
        import psutil

        started = round(psutil.Process(sleeper.pid).create_time(), 2)
        here = f"{me.host} {me.machine}"
        alive = mlflow.get_run(unfinished_run(mlflow_store, f"{here} {sleeper.pid} {started}", 0))
        reused_pid = mlflow.get_run(unfinished_run(mlflow_store, f"{here} {sleeper.pid} {started - 50}", 0))
        assert ownership.Watch().writer(alive).pid == sleeper.pid
        assert ownership.Watch().writer(reused_pid) is None  # same pid, another process
        sleeper.kill()
        sleeper.wait()
        assert ownership.Watch().writer(alive) is None  # ended: no need to wait for its heartbeat
    mine = mlflow.get_run(unfinished_run(mlflow_store, str(me), 0))
    assert ownership.Watch().writer(mine) is None  # this process's own unfinished run: resumable


def test_claim_waits_for_a_live_writer_elsewhere_then_reuses_its_run(mlflow_store: str, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_id = unfinished_run(mlflow_store, ELSEWHERE, time.time())
    said: list[str] = []
    outcome: dict[str, str | None] = {}

    def claim() -> None:
        with ReuseOrResume.claim(mlflow_store, STAGE, KEY, log=said.append) as recorded:
            outcome["reused"] = recorded.reusable.info.run_id if recorded.reusable else None

    waiting = threading.Thread(target=claim)
    waiting.start()
    time.sleep(3)
    assert waiting.is_alive() and said and run_id in said[0] and "4242" in said[0]  # waiting, naming what
    mlflow.MlflowClient().set_terminated(run_id, "FINISHED")  # the other machine finishes
    waiting.join(timeout=30)
    assert outcome == {"reused": run_id}


def test_a_stopped_writer_is_taken_over_and_ends_when_continued(worker, mlflow_store: str, monkeypatch):
    """SIGSTOP: the writer's process exists but its heartbeat stands still; the claim resumes its
    run after STALE_SECONDS. Continued, the old writer finds another owner and exits at once,
    without touching the run (no second writer, no KILLED over the new owner's RUNNING)."""
    monkeypatch.setattr(ownership, "STALE_SECONDS", 3.0)
    stopped = worker(600.0, beat=0.5)
    _, run_id = stopped.stdout.readline().split()
    stopped.send_signal(signal.SIGSTOP)
    outcome: dict[str, object] = {}

    def take_over() -> None:
        with (
            ReuseOrResume.claim(mlflow_store, STAGE, KEY) as recorded,
            recorded.start(data_version="v1", params={}, run_name="ae-f8") as run,
        ):
            outcome["run"] = run.info.run_id
            stopped.send_signal(signal.SIGCONT)
            outcome["old writer"] = stopped.wait(timeout=30)
            outcome["owner"] = mlflow.get_run(run_id).data.tags[ownership.TAG_OWNER]
            outcome["status"] = mlflow.get_run(run_id).info.status

    claimant = threading.Thread(target=take_over)
    claimant.start()
    claimant.join(timeout=45)
    if claimant.is_alive():  # still waiting for the stopped writer: let both go, then fail
        stopped.send_signal(signal.SIGCONT)
        stopped.kill()
        claimant.join(timeout=30)
    assert outcome.get("run") == run_id, "the claim kept waiting for a stopped writer"
    assert outcome["old writer"] == ownership.EXIT_TAKEN_OVER
    assert outcome["owner"] == str(ownership.Owner.me()) and outcome["status"] == "RUNNING"
    assert "taken over" in stopped.stderr.read()
    assert mlflow.get_run(run_id).info.status == "FINISHED" and len(runs_of_key(mlflow_store)) == 1


LOCKER = textwrap.dedent(
    """
    import time
    from components import ownership
    with ownership.key_lock("autoencoder-feedfacefeedfacefeed", print):
        print("locked", flush=True)
        time.sleep(600)
    """
)


def test_a_lock_held_by_a_stopped_process_is_an_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ownership, "STALE_SECONDS", 2.0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen([sys.executable, "-c", LOCKER], env=env, stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout.readline().strip() == "locked"
            holder.send_signal(signal.SIGSTOP)
            said: list[str] = []
            outcome: dict[str, BaseException | None] = {}

            def claim() -> None:
                try:
                    with ownership.key_lock("autoencoder-feedfacefeedfacefeed", said.append):
                        outcome["error"] = None
                except ownership.LockHeld as error:
                    outcome["error"] = error

            claimant = threading.Thread(target=claim, daemon=True)
            started = time.monotonic()
            claimant.start()
            claimant.join(timeout=20)
            assert "error" in outcome, "waited without end for a stopped holder"
            message = str(outcome["error"])
            assert f"process {holder.pid}" in message and f"kill -CONT {holder.pid}" in message
            assert time.monotonic() - started < 10 and str(holder.pid) in said[0]
            holder.send_signal(signal.SIGCONT)
            holder.kill()
            holder.wait()
            with ownership.key_lock("autoencoder-feedfacefeedfacefeed", said.append):  # a killed holder frees it
                pass
        finally:
            holder.kill()


def test_a_failing_heartbeat_is_logged_and_its_return_too(mlflow_store: str, tmp_path, monkeypatch, caplog):
    """A store that does not answer (here: SQLite locked by another writer) is said, not swallowed."""
    monkeypatch.setattr(ownership, "HEARTBEAT_SECONDS", 0.2)
    run_id = mlflow.MlflowClient().create_run(mlflow_store).info.run_id
    caplog.set_level("WARNING", logger="latentlab")
    with ownership.heartbeat(run_id):
        blocker = sqlite3.connect(tmp_path / "mlflow.db", timeout=0)
        blocker.execute("BEGIN EXCLUSIVE")
        deadline = time.monotonic() + 60
        while "failed" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.2)
        blocker.rollback()
        blocker.close()
        while "restored" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.2)
    assert f"Heartbeat of run {run_id} failed" in caplog.text
    assert f"Heartbeat of run {run_id} restored" in caplog.text


def test_one_run_registered_by_two_processes_at_once_has_one_version(mlflow_store: str, tmp_path):
    """The store has no register-if-absent: both may register, and both must end on one version."""
    script = textwrap.dedent(
        """
        import sys, time
        from components.tracking import register_once
        run_id, model_uri, go = sys.argv[1], sys.argv[2], float(sys.argv[3])
        time.sleep(max(0.0, go - time.time()))
        print(register_once("race", run_id, model_uri, {}), flush=True)
        """
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "PYTHONPATH": str(REPO)}
    client = mlflow.MlflowClient()
    for _ in range(4):
        run_id = client.create_run(mlflow_store).info.run_id
        model = mlflow.initialize_logged_model(name="model", source_run_id=run_id, experiment_id=mlflow_store)
        mlflow.finalize_logged_model(model.model_id, "READY")  # as publishing a model leaves it
        go = time.time() + 4  # both past their imports, then register in the same instant
        racers = [
            subprocess.Popen(
                [sys.executable, "-c", script, run_id, f"models:/{model.model_id}", str(go)],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        printed = {racer.communicate(timeout=120)[0].strip() for racer in racers}
        versions = client.search_model_versions(f"name = 'race' and run_id = '{run_id}'")
        assert len(versions) == 1 and printed == {str(versions[0].version)}


@pytest.mark.slow
def test_two_directories_against_one_mlflow_server_train_a_model_once(tmp_path, repo, ae_smoke, mlflow_server_at):
    """Two projects (no shared lock files) on one real `mlflow server`: the second sees the
    first's autoencoder run being written by a live owner, waits, and reuses it."""
    with mlflow_server_at(tmp_path / "server.db", (tmp_path / "server-artifacts").as_uri()) as uri:
        client = mlflow.MlflowClient(tracking_uri=uri)
        deadline = time.time() + 300
        command = [
            str(Path(sys.executable).with_name("latentlab")),
            "train-ae",
            "--params",
            str(repo / "params/smoke.yaml"),
        ]
        # long enough that the second starts while the first trains; few uploads per step
        for setting in [
            *ae_smoke,
            "ae.max_steps=300",
            "ae.log_every=10",
            "ae.image_every=100",
            "ae.checkpoint_every=50",
        ]:
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
        while not autoencoder_runs() and time.time() < deadline:
            time.sleep(0.5)
        second = start("b")  # the first's run is open now: the second must not write it or another
        outputs = [process.communicate(timeout=600)[0] for process in (first, second)]
        assert [first.returncode, second.returncode] == [0, 0], "\n".join(o[-2000:] for o in outputs)
        assert "litlogger" not in outputs[0] and "LeafSpec" not in outputs[0]  # third-party noise, silenced
        (run,) = autoencoder_runs()
        assert run.info.status == "FINISHED" and run.info.run_id in outputs[1]  # the second printed it: reused
        assert f"run {run.info.run_id} is being written by" in " ".join(outputs[1].split())  # after waiting for it
        assert len(client.search_model_versions("name = 'autoencoder-f4-kl'")) == 1
        # the command line's glance at a run, through the server's REST API (no MLflow client)
        assert store.glance(run.info.run_id, uri) == store.RunGlance(True, False, "autoencoder")
        assert store.glance("0123456789abcdef0123456789abcdef", uri) == store.RunGlance(exists=False)
