"""Training on several processes (Lightning's DDP), started by the stage itself.

Lightning's own launchers do not fit a stage that runs inside a command and a Prefect flow:
``ddp`` executes the command line again for each rank (a second sweep, claiming the same runs),
``ddp_spawn`` pickles the trainer with its callbacks (MLflow clients, the FID reference) and
``ddp_fork`` copies the heartbeat and Prefect threads into each rank. So the stage's own process
is rank 0 — it keeps the MLflow run, the reports and the checkpoints — and starts ranks
1..N-1 as plain processes (``python -m components.distributed <folder>``) that run the same
training function on the same data and report nothing. Lightning sees ``LOCAL_RANK`` set and
treats the ranks as launched from outside; DDP gives every rank rank 0's weights when it wraps
the model, and each rank trains on its share of every epoch (``DistributedSampler``).

What a rank needs travels as JSON (the arguments) and safetensors (the tensors): nothing is
unpickled. What the ranks must agree on, or one waits forever for a collective the other
never enters (when to stop, when to save, the learning rate), is decided from rank 0's clock
(``training.Budget``, ``training.PeriodicCheckpoint``).

A rank that dies makes the others' next collective fail at once (its connections close); a
rank that is stopped (SIGSTOP) or frozen keeps them open, and the others would wait for DDP's
30-minute timeout. So while they train, rank 0 watches the other ranks (``_Watchdog``): one
stopped for ``STALL_S`` is ended with the rest, which fails rank 0's collective, and the stage
fails with that rank's last lines.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import torch
from safetensors.torch import load_file, save_file

from components.errors import UserError

RANK_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
READY_TIMEOUT_S = 300.0  # a rank builds its model and data in seconds; this is for a machine under load
EXIT_TIMEOUT_S = 120.0
STALL_S = 30.0  # a rank stopped this long is ended: the others would wait for it for half an hour
FOLDER_ENV = "LATENTLAB_RANK_FOLDER"


@contextmanager
def ranks(
    devices: int, folder: Path, entry: str, args: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> Iterator[None]:
    """Around a training function's ``make_trainer`` + ``fit`` in rank 0: with ``devices`` > 1,
    starts ranks 1..devices-1, each calling ``entry`` ("module:function") with ``args`` and
    ``tensors``; waits for them to finish after the block and fails if one did. A no-op for
    one device and inside a rank (where ``entry`` itself runs this block)."""
    if devices == 1 or "LOCAL_RANK" in os.environ:
        _mark_ready()
        yield
        return
    folder = Path(folder).resolve()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "spec.json").write_text(json.dumps({"entry": entry, "args": args}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "tensors.safetensors")
    env = {
        "NODE_RANK": "0",
        "WORLD_SIZE": str(devices),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }
    threads = torch.get_num_threads()
    helpers = [_start(folder, rank, {**os.environ, **env, "LOCAL_RANK": str(rank)}) for rank in range(1, devices)]
    saved = {name: os.environ.get(name) for name in RANK_ENV}
    watchdog = _Watchdog(helpers)
    try:
        _wait_until_ready(folder, helpers)
        os.environ.update(env, LOCAL_RANK="0")
        torch.set_num_threads(threads_per_rank(devices))
        watchdog.start()
        try:
            yield
        except UserError:  # rank 0's own reason (a diverged loss): the others stop on it, not it on them
            raise
        except Exception:
            watchdog.halt()
            casualty = watchdog.casualty or _first_dead(helpers)
            if casualty is None:
                raise
            raise _failure(folder, *casualty) from None  # not gloo's "connection closed": which rank, and why
        watchdog.halt()
        _wait_for_exit(folder, helpers)
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        watchdog.halt()
        for process in helpers:
            if process.poll() is None:
                process.kill()
        torch.set_num_threads(threads)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if torch.distributed.is_initialized():  # Lightning leaves the group up; the next training makes its own
            torch.distributed.destroy_process_group()


def threads_per_rank(devices: int) -> int:
    """The CPU's cores shared between the ranks: more threads than cores slow every rank down."""
    return max(1, (os.cpu_count() or 1) // devices)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(folder: Path, rank: int, env: dict[str, str]) -> subprocess.Popen:
    with open(folder / f"rank{rank}.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "components.distributed", str(folder)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _failure(folder: Path, rank: int, how: str) -> UserError:
    tail = (folder / f"rank{rank}.log").read_text(errors="replace").strip().splitlines()[-15:]
    return UserError(f"Training process {rank} {how}; its last lines:\n  " + "\n  ".join(tail))


def _ended(process: subprocess.Popen) -> str:
    code = process.returncode
    if code is not None and code < 0:
        return f"was killed ({signal.Signals(-code).name})"
    return f"stopped (exit code {code})"


def _first_dead(helpers: list[subprocess.Popen]) -> tuple[int, str] | None:
    for rank, process in enumerate(helpers, start=1):
        if process.poll() not in (None, 0):
            return rank, _ended(process)
    return None


class _Watchdog(threading.Thread):
    """Rank 0's eye on the other ranks while they train: when one has been stopped for
    ``STALL_S``, or has died, every other rank is ended too, so that no collective waits for
    them; ``casualty`` says which rank and what happened."""

    def __init__(self, helpers: list[subprocess.Popen]):
        super().__init__(name="ranks-watchdog", daemon=True)
        self.helpers = helpers
        self.casualty: tuple[int, str] | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        stopped_since: dict[int, float] = {}
        while not self._halt.wait(0.5):
            dead = _first_dead(self.helpers)
            if dead is not None:
                return self._end(dead)
            for rank, process in enumerate(self.helpers, start=1):
                if not _is_stopped(process):
                    stopped_since.pop(rank, None)
                elif time.monotonic() - stopped_since.setdefault(rank, time.monotonic()) >= STALL_S:
                    return self._end((rank, f"was stopped (SIGSTOP or frozen) for {STALL_S:.0f} s and was ended"))

    def _end(self, casualty: tuple[int, str]) -> None:
        self.casualty = casualty
        for process in self.helpers:
            if process.poll() is None:
                process.kill()  # closes its connections: rank 0's collective fails now, not in 30 minutes

    def halt(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join()


def _is_stopped(process: subprocess.Popen) -> bool:
    try:
        return psutil.Process(process.pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
    except psutil.Error:
        return False


def _wait_until_ready(folder: Path, helpers: list[subprocess.Popen]) -> None:
    """Until every rank has built its model and data (``<folder>/ready<rank>``): a rank that
    fails before it joins would leave rank 0 waiting for it for DDP's whole timeout."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    for rank, process in enumerate(helpers, start=1):
        while not (folder / f"ready{rank}").exists():
            if process.poll() is not None:
                raise _failure(folder, rank, _ended(process))
            if time.monotonic() > deadline:
                raise UserError(f"Training process {rank} did not start within {READY_TIMEOUT_S:.0f} s.")
            time.sleep(0.05)


def _wait_for_exit(folder: Path, helpers: list[subprocess.Popen]) -> None:
    for rank, process in enumerate(helpers, start=1):
        try:
            process.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.returncode != 0:
            raise _failure(folder, rank, _ended(process))


def _mark_ready() -> None:
    """In a helper rank (``main`` set its folder), at ``ranks``: its model and data are built, DDP comes next."""
    folder = os.environ.get(FOLDER_ENV)
    if folder:
        (Path(folder) / f"ready{os.environ['LOCAL_RANK']}").touch()


def main(folder: str) -> None:
    """A helper rank: the entry point with its arguments and tensors, nothing reported."""
    os.environ[FOLDER_ENV] = folder
    spec = json.loads((Path(folder) / "spec.json").read_text())
    tensors = load_file(Path(folder) / "tensors.safetensors")
    torch.set_num_threads(threads_per_rank(int(os.environ["WORLD_SIZE"])))
    module_name, function = spec["entry"].split(":")
    getattr(importlib.import_module(module_name), function)(spec["args"], tensors)


if __name__ == "__main__":
    main(sys.argv[1])
