"""Who is writing a run, so that no run ever has two writers (issue 13).

Every run the platform opens records its owner (``host pid start-time``) and a heartbeat that a
thread refreshes while the run is open. An unfinished run is resumed only when its owner is
gone: on this host, its process no longer exists (a pid reused by another process has another
start time); on another host, its heartbeat stopped. While the owner lives, a stage waits.

On one machine a lock file per run key also covers the moment between looking a key up and
opening its run: the kernel releases it when its process ends, even by ``kill -9``, so a killed
process never leaves a key locked. (Across machines that moment is guarded by nothing but its
shortness; see the README.)
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import psutil
from filelock import FileLock, Timeout
from mlflow import MlflowClient
from mlflow.entities import Run, RunStatus

from components import workspace

TAG_OWNER = "latentlab.owner"
TAG_HEARTBEAT = "latentlab.heartbeat"  # unix seconds of the owner's last sign of life
TAG_CLOSED_REASON = "latentlab.closed_reason"  # on runs closed KILLED: stopped, or their owner died
HEARTBEAT_SECONDS = 15.0
STALE_SECONDS = 90.0  # a heartbeat this old means the owner (on another host) is gone
WAIT_LOG_SECONDS = 60.0


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    started: float  # the process's start time: tells a live owner from a reused pid

    @classmethod
    def me(cls) -> Owner:
        return cls(socket.gethostname(), psutil.Process().pid, round(psutil.Process().create_time(), 2))

    @classmethod
    def parse(cls, tag: str | None) -> Owner | None:
        try:
            host, pid, started = (tag or "").rsplit(" ", 2)
            return cls(host, int(pid), float(started))
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"{self.host} {self.pid} {self.started}"

    def alive(self, heartbeat: float | None) -> bool:
        if self.host != socket.gethostname():
            return heartbeat is not None and time.time() - heartbeat < STALE_SECONDS
        try:
            return abs(psutil.Process(self.pid).create_time() - self.started) < 1.0
        except psutil.Error:
            return False


def live_writer(run: Run) -> Owner | None:
    """The owner of unfinished ``run`` if it is another process that is still alive, else None
    (a run from before owners were recorded counts as ownerless)."""
    owner = Owner.parse(run.data.tags.get(TAG_OWNER))
    if owner is None or owner == Owner.me():
        return None
    beat = run.data.tags.get(TAG_HEARTBEAT)
    return owner if owner.alive(float(beat) if beat else None) else None


@contextmanager
def key_lock(name: str, log: Callable[[str], None]) -> Iterator[None]:
    """This machine's lock on one run key (``workspace.lock_file``); says so while it waits."""
    path = workspace.lock_file(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"Another latentlab process on this machine holds {name}; waiting for it")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextmanager
def heartbeat(run_id: str) -> Iterator[None]:
    """Mark ``run_id`` as this process's and keep its heartbeat fresh until the block ends."""
    client = MlflowClient()
    _open_runs.add(run_id)
    client.set_tag(run_id, TAG_OWNER, str(Owner.me()))
    client.set_tag(run_id, TAG_HEARTBEAT, f"{time.time():.0f}")
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            with suppress(Exception):  # a tracking hiccup must not stop training; the next beat retries
                client.set_tag(run_id, TAG_HEARTBEAT, f"{time.time():.0f}")

    thread = threading.Thread(target=beat, name=f"heartbeat-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        _open_runs.discard(run_id)


_open_runs: set[str] = set()  # the runs this process writes now (in ``heartbeat`` blocks)


def close_mine(reason: str) -> None:
    """Mark KILLED, with ``reason``, every run this process is writing: for a process about to
    exit without unwinding (a stopped sweep's worker threads cannot be). Best effort."""
    for run_id in list(_open_runs):
        with suppress(Exception):
            close_killed(run_id, reason)


def close_killed(run_id: str, reason: str) -> None:
    """End ``run_id`` KILLED, saying why: it was stopped, not failed; its stage resumes it."""
    client = MlflowClient()
    client.set_tag(run_id, TAG_CLOSED_REASON, reason)
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))


def close_orphans(experiment_id: str) -> list[str]:
    """Mark KILLED every RUNNING run of the experiment whose owner is gone, with the reason, so
    RUNNING in the MLflow UI means running; an orphan of a stage is still resumed by that
    stage's next attempt (``ReuseOrResume`` resumes any unfinished run). Returns their ids."""
    client = MlflowClient()
    closed = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        owner = Owner.parse(run.data.tags.get(TAG_OWNER))
        if owner is None or owner == Owner.me() or live_writer(run) is not None:
            continue
        close_killed(run.info.run_id, f"its process ({owner}) ended without closing it")
        closed.append(run.info.run_id)
    return closed
