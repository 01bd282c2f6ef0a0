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
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from components.errors import UserError

RANK_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
READY_TIMEOUT_S = 300.0  # a rank builds its model and data in seconds; this is for a machine under load
EXIT_TIMEOUT_S = 120.0
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
    try:
        _wait_until_ready(folder, helpers)
        os.environ.update(env, LOCAL_RANK="0")
        torch.set_num_threads(threads_per_rank(devices))
        yield
        _wait_for_exit(folder, helpers)
        shutil.rmtree(folder, ignore_errors=True)
    finally:
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


def _failure(folder: Path, rank: int, process: subprocess.Popen) -> UserError:
    tail = (folder / f"rank{rank}.log").read_text(errors="replace").strip().splitlines()[-15:]
    return UserError(
        f"Training process {rank} stopped (exit code {process.returncode}); its last lines:\n  " + "\n  ".join(tail)
    )


def _wait_until_ready(folder: Path, helpers: list[subprocess.Popen]) -> None:
    """Until every rank has built its model and data (``<folder>/ready<rank>``): a rank that
    fails before it joins would leave rank 0 waiting for it for DDP's whole timeout."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    for rank, process in enumerate(helpers, start=1):
        while not (folder / f"ready{rank}").exists():
            if process.poll() is not None:
                raise _failure(folder, rank, process)
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
            raise _failure(folder, rank, process)


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
