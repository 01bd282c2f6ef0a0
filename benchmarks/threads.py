"""Why a one-worker sweep trains in the main thread: the same f=8 LDM training step, timed in
the main thread and in a worker thread (as a thread-pool task runner would run it), with
PyTorch's default thread count and with one thread. Ratios are measured in one run.

    python benchmarks/threads.py [--steps 40]

Writes reports/benchmarks/threads.json.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from components.conditioning import Conditioner
from components.diffusion import LatentDiffusionModule
from components.presets import load_params

OUT = Path("reports/benchmarks")


def img_per_s(
    module: LatentDiffusionModule, optimizer: torch.optim.Optimizer, steps: int, threads: int, batch: int = 32
) -> float:
    """Training img/s in the calling thread (PyTorch's thread count is set per calling thread)."""
    torch.set_num_threads(threads)
    latents, cond = torch.randn(batch, 4, 8, 8), torch.randint(0, 11, (batch,))

    def train(n: int) -> None:
        for _ in range(n):
            loss = module.loss(latents, cond)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    train(5)  # warm-up: first-call allocations and kernel selection
    started = time.perf_counter()
    train(steps)
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    steps = parser.parse_args().steps
    ldm = load_params("params/default.yaml").ldm
    torch.manual_seed(0)
    module = LatentDiffusionModule(ldm.model_dump(mode="json"), 4, 8, 11, Conditioner("class", 11, ldm.context_dim))
    optimizer = module.configure_optimizers()
    results = {}
    for threads in (torch.get_num_threads(), 1):
        main_thread = img_per_s(module, optimizer, steps, threads)
        with ThreadPoolExecutor(1) as pool:
            worker_thread = pool.submit(img_per_s, module, optimizer, steps, threads).result()
        results[f"{threads}_threads"] = {
            "main_img_per_s": round(main_thread, 1),
            "worker_img_per_s": round(worker_thread, 1),
            "worker_over_main": round(worker_thread / main_thread, 2),
        }
        print(threads, "thread(s):", results[f"{threads}_threads"], flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "threads.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
