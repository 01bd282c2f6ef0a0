"""Who is writing a run, so that no run ever has two writers (issues 13 and 29).

Every run the platform opens records its owner (machine, pid, process start) and a heartbeat
that a thread refreshes while the run is open. An unfinished run is taken over only when its
owner is gone: a process of this machine that has ended (a reused pid has another start time),
or, anywhere, an owner whose heartbeat has not changed for ``STALE_SECONDS`` as the *waiting*
process measures time (``Watch``). No two clocks are ever compared, so skewed clocks cannot
make a live owner look dead or a dead one alive; and a stopped (SIGSTOP), hung or cut-off owner
stops beating like a dead one. Machines are told apart by hostname, machine id, boot and PID
namespace (``machine_id``), not by hostname alone.

An owner whose run was taken over stops writing it: every beat first rereads the run's owner,
and so does the end of the run, and a process that finds another owner there exits at once
(``EXIT_TAKEN_OVER``) without touching the run. A beat that fails (the store does not answer)
is logged, not swallowed; the owner keeps training and checks again when the store answers.

On one machine a lock file per run key (``key_lock``) covers the moment between looking a key
up and opening its run as its owner: the kernel releases it when its process ends, even by
``kill -9``; a holder that is stopped for ``STALE_SECONDS`` is named in an error with the fix.
(Across machines that moment is guarded by nothing but its shortness; see docs/operations.md.)
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil
from filelock import FileLock, Timeout
from mlflow import MlflowClient
from mlflow.entities import Run, RunStatus

from components import workspace
from components.credentials import redact
from components.errors import UserError

TAG_OWNER = "latentlab.owner"
TAG_HEARTBEAT = "latentlab.heartbeat"  # the owner's unix seconds at its last beat (for people; see Watch)
TAG_CLOSED_REASON = "latentlab.closed_reason"  # on runs closed KILLED: stopped, or their owner died
HEARTBEAT_SECONDS = 15.0
STALE_SECONDS = 90.0  # a heartbeat unchanged this long (the watcher's clock): its owner is gone or stopped
WAIT_LOG_SECONDS = 60.0
EXIT_TAKEN_OVER = 75  # EX_TEMPFAIL: this process was stopped too long; another one writes its run now

log = logging.getLogger("latentlab")


@functools.cache
def machine_id() -> str:
    """This boot of this machine, in this PID namespace: a pid means one process only within it.
    Hostnames repeat across machines and containers; a reboot ends every process before it."""
    parts = [socket.gethostname()]
    for path in ("/etc/machine-id", "/proc/sys/kernel/random/boot_id"):
        with suppress(OSError):
            parts.append(Path(path).read_text().strip())
    with suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Owner:
    host: str  # for people; ``machine`` decides
    machine: str  # ``machine_id()`` of the owner's machine ("" from before it was recorded)
    pid: int
    started: float  # the process's start time: tells a live owner from a reused pid

    @classmethod
    def me(cls) -> Owner:
        process = psutil.Process()
        return cls(socket.gethostname(), machine_id(), process.pid, round(process.create_time(), 2))

    @classmethod
    def parse(cls, tag: str | None) -> Owner | None:
        fields = (tag or "").split(" ")
        try:
            if len(fields) == 3:  # host pid started, as runs recorded it before the machine id
                return cls(fields[0], "", int(fields[1]), float(fields[2]))
            host, machine, pid, started = fields
            return cls(host, machine, int(pid), float(started))
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"{self.host} {self.machine} {self.pid} {self.started}"

    def here(self) -> bool:
        return self.machine == machine_id()

    def _process(self) -> psutil.Process | None:
        """Its process, when it runs on this machine and is still the same process."""
        if not self.here():
            return None
        try:
            process = psutil.Process(self.pid)
            return process if abs(process.create_time() - self.started) < 1.0 else None
        except psutil.Error:
            return None

    def ended(self) -> bool:
        """Known to have ended: a process of this machine that no longer runs."""
        return self.here() and self._process() is None

    def stopped(self) -> bool:
        """A process of this machine that is stopped (SIGSTOP, Ctrl-Z) or halted by a tracer."""
        process = self._process()
        with suppress(psutil.Error):
            return process is not None and process.status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
        return False

    def describe(self) -> str:
        """'pid 123 on host (stopped)': how messages name it."""
        process = self._process()
        state = ""
        with suppress(psutil.Error):
            state = f", {' '.join(process.cmdline()[1:4])[:60]}, {process.status()}" if process else ""
        where = "this machine" if self.here() else f"host {self.host}"
        return f"process {self.pid} on {where}{state}"


class Watch:
    """Whether an unfinished run's writer is still writing, as one waiting process sees it: gone
    at once when its owner was a process of this machine that has ended, otherwise once its
    heartbeat has not changed for ``STALE_SECONDS`` of this process's monotonic clock."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str | None, float]] = {}  # run id -> (heartbeat, since when)

    def writer(self, run: Run) -> Owner | None:
        """The run's live writer, or None when there is none (ownerless, this process, gone)."""
        owner = Owner.parse(run.data.tags.get(TAG_OWNER))
        if owner is None or owner == Owner.me() or owner.ended():
            return None
        beat, now = run.data.tags.get(TAG_HEARTBEAT), time.monotonic()
        seen = self._seen.get(run.info.run_id)
        if seen is None or seen[0] != beat:
            self._seen[run.info.run_id] = (beat, now)
            return owner
        return owner if now - seen[1] < STALE_SECONDS else None

    def silent_for(self, run: Run) -> float:
        """Seconds since its heartbeat last changed, as far as this watch has seen it."""
        seen = self._seen.get(run.info.run_id)
        return time.monotonic() - seen[1] if seen else 0.0


class LockHeld(UserError):
    """A run key's lock is held by a process that is stopped: named, with how to go on."""


class KeyLock:
    """This machine's lock on one run key (``workspace.lock_file``); ``.holder`` beside it
    names the process that holds it, for the messages of those who wait."""

    def __init__(self, name: str):
        self.name = name
        self.path = workspace.lock_file(name)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._holder = self.path.with_name(f"{self.path.name}.holder")
        self._lock = FileLock(self.path)

    def holder(self) -> Owner | None:
        with suppress(OSError):
            owner = Owner.parse(self._holder.read_text())
            return owner if owner is not None and not owner.ended() else None
        return None

    def acquire(self, log: Callable[[str], None]) -> None:
        """Take the lock, waiting while another process holds it (and saying which); a holder
        stopped for ``STALE_SECONDS`` is a ``LockHeld`` error instead of a wait without end."""
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            self._wait(log)
        workspace.write_atomically(self._holder, lambda tmp: tmp.write_text(str(Owner.me())))

    def _wait(self, log: Callable[[str], None]) -> None:
        logged, stopped_since = -WAIT_LOG_SECONDS, None
        while True:
            holder = self.holder()
            now = time.monotonic()
            if now - logged >= WAIT_LOG_SECONDS:
                named = holder.describe() if holder else "another latentlab process on this machine"
                log(f"{named} holds {self.name}; waiting for it")
                logged = now
            if holder is not None and holder.stopped():
                stopped_since = stopped_since or now
                if now - stopped_since >= STALE_SECONDS:
                    raise LockHeld(
                        f"{holder.describe()} holds the lock on {self.name} and has been stopped for "
                        f"{now - stopped_since:.0f} s (Ctrl-Z or SIGSTOP): continue it (kill -CONT {holder.pid}, "
                        f"or fg in its terminal) or end it (kill {holder.pid}), then run this again."
                    )
            else:
                stopped_since = None
            try:
                self._lock.acquire(timeout=1.0)
                return
            except Timeout:
                continue

    def release(self) -> None:
        """Let the next process in (idempotent: the claim releases early, its block again)."""
        if self._lock.is_locked:
            self._lock.release(force=True)


@contextmanager
def key_lock(name: str, log: Callable[[str], None]) -> Iterator[KeyLock]:
    """Hold this machine's lock on ``name`` for the block (or until ``release``)."""
    lock = KeyLock(name)
    lock.acquire(log)
    try:
        yield lock
    finally:
        lock.release()


@contextmanager
def heartbeat(run_id: str) -> Iterator[None]:
    """Mark ``run_id`` as this process's and keep its heartbeat fresh until the block ends;
    exit at once (``EXIT_TAKEN_OVER``) when another process turns out to own it."""
    client = MlflowClient()
    me = str(Owner.me())
    _open_runs.add(run_id)
    client.set_tag(run_id, TAG_OWNER, me)
    client.set_tag(run_id, TAG_HEARTBEAT, f"{time.time():.0f}")
    stop = threading.Event()
    thread = threading.Thread(
        target=_beat, args=(client, run_id, me, stop), name=f"heartbeat-{run_id[:8]}", daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        _open_runs.discard(run_id)
        with suppress(Exception):  # a store that fails here fails the run's end too; nothing to check against
            _exit_if_taken_over(client, run_id, me)


def _beat(client: MlflowClient, run_id: str, me: str, stop: threading.Event) -> None:
    failing_since = None
    while not stop.wait(HEARTBEAT_SECONDS):
        try:
            _exit_if_taken_over(client, run_id, me)
            client.set_tag(run_id, TAG_HEARTBEAT, f"{time.time():.0f}")
        except Exception as error:  # training goes on; the next beat tries again
            if failing_since is None:
                failing_since = time.monotonic()
                log.warning(
                    "Heartbeat of run %s failed (%s); training goes on. If the store stays out of reach for "
                    "%.0f s another process may take the run over, and this one then stops.",
                    run_id,
                    redact(str(error))[:200],
                    STALE_SECONDS,
                )
            continue
        if failing_since is not None:
            log.warning("Heartbeat of run %s restored after %.0f s", run_id, time.monotonic() - failing_since)
            failing_since = None


def _exit_if_taken_over(client: MlflowClient, run_id: str, me: str) -> None:
    owner = client.get_run(run_id).data.tags.get(TAG_OWNER)
    if owner is None or owner == me:
        return
    other = Owner.parse(owner)
    message = (
        f"Run {run_id} is now written by {other.describe() if other else owner}: this process was stopped or cut "
        f"off from the store for over {STALE_SECONDS:.0f} s and the run was taken over. This process stops here "
        "and leaves the run to it."
    )
    log.error(message)
    print(f"latentlab: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_TAKEN_OVER)  # at once: unwinding would close or upload into the other's run


_open_runs: set[str] = set()  # the runs this process writes now (in ``heartbeat`` blocks)


def still_mine(run_id: str) -> None:
    """Return if this process owns ``run_id`` (or the store cannot tell); exit if it was taken over."""
    with suppress(Exception):
        _exit_if_taken_over(MlflowClient(), run_id, str(Owner.me()))


def close_mine(reason: str) -> None:
    """Mark KILLED, with ``reason``, every run this process is writing: for a process about to
    exit without unwinding (a stopped sweep's worker threads cannot be). Best effort."""
    for run_id in list(_open_runs):
        with suppress(Exception):
            still_mine(run_id)
            close_killed(run_id, reason)


def close_killed(run_id: str, reason: str) -> None:
    """End ``run_id`` KILLED, saying why: it was stopped, not failed; its stage resumes it."""
    client = MlflowClient()
    client.set_tag(run_id, TAG_CLOSED_REASON, reason)
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))


def close_orphans(experiment_id: str) -> list[str]:
    """Mark KILLED every RUNNING run of the experiment whose owner was a process of this machine
    that has ended, with the reason, so RUNNING in the MLflow UI means running. Runs of other
    machines are left to their stage: a claim takes one over once its heartbeat has stopped
    (``Watch``), which one look cannot tell. An orphan is still resumed by its stage's next
    attempt (``ReuseOrResume`` resumes any unfinished run). Returns their ids."""
    client = MlflowClient()
    closed = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        owner = Owner.parse(run.data.tags.get(TAG_OWNER))
        if owner is None or not owner.ended():
            continue
        close_killed(run.info.run_id, f"its process ({owner.pid} on {owner.host}) ended without closing it")
        closed.append(run.info.run_id)
    return closed
