"""Latent diffusion benchmarks (issue: latent diffusion stage). Ratios are measured in one run.

    python benchmarks/ldm.py            # all four, default params at 64 px
    python benchmarks/ldm.py --steps 20 # fewer steps per measurement

1. platform overhead: latentlab's Lightning training (checkpoints, MLflow reporting, EMA) vs a
   bare PyTorch loop over the same model, batch and latents (goal: >= 0.95 of its img/s);
2. latent cache: img/s on cached latents vs encoding every batch with the first stage (f = 4, 8);
3. hardware use: training FLOP/s (torch.utils.flop_counter) / a 2048x2048 fp32 matmul's FLOP/s;
4. latent vs pixel: img/s at f = 8 vs f = 1.

Writes reports/benchmarks/ldm.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import mlflow
import torch

from components.conditioning import Conditioner
from components.diffusion import LatentDiffusionModule
from components.first_stage import build_first_stage
from components.images import to_float
from components.ldm_training import flops_per_step, train_ldm
from components.mlflow_callbacks import MLflowReporter
from components.presets import load_params

OUT = Path("reports/benchmarks")


def setup(factor: int):
    params = load_params("params/default.yaml", [f"ae.factor={factor}"])
    stage = build_first_stage(params.ae, 64).eval()
    channels, size, _ = stage.latent_shape(64)
    module = LatentDiffusionModule(
        params.ldm.model_dump(mode="json"), channels, size, 11, Conditioner("class", 11, params.ldm.context_dim)
    )
    n = params.ldm.batch_size * 4
    images = (torch.rand(n, 3, 64, 64) * 255).to(torch.uint8)
    with torch.no_grad():
        latents = torch.cat([stage.encode(to_float(c)) for c in images.split(32)])
    cond = torch.randint(0, 11, (n,))
    return params, stage, module, images, latents, cond


def bare_loop(module, latents, cond, batch, steps, encode=None) -> float:
    """img/s of the plainest loop: loss, backward, AdamW, EMA."""
    optimizer = module.configure_optimizers()
    started = None
    for step in range(steps + 1):
        if step == 1:
            started = time.perf_counter()  # the first step warms up
        i = (step * batch) % len(latents)
        z = latents[i : i + batch] if encode is None else encode(i, i + batch)
        optimizer.zero_grad(set_to_none=True)
        module.loss(z, cond[i : i + batch]).backward()
        optimizer.step()
        module.ema.step(module.unet.parameters())
    return steps * batch / (time.perf_counter() - started)


def platform(params, module, latents, cond, steps) -> float:
    """Steady-state img/s of ``train_ldm`` (Lightning, EMA, MLflow reporting every 10 steps)
    as its reporter logs it, leaving out the first window (warm-up, like the bare loop)."""
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        with mlflow.start_run() as run:
            ldm = params.ldm.model_copy(update={"max_steps": max(steps, 30), "log_every": 10, "image_every": 10**9})
            reporter = MLflowReporter(run.info.run_id, ldm, lambda module: None, "samples")
            train_ldm(module, ldm, latents, cond, checkpoint_dir=Path(tmp) / "ckpt", seed=0, callbacks=[reporter])
            history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_img_per_s")
        mlflow.set_tracking_uri(None)
    windows = [m.value for m in sorted(history, key=lambda m: m.step)][1:]
    return sum(windows) / len(windows)


def matmul_flops() -> float:
    a = torch.randn(2048, 2048)
    a @ a
    started = time.perf_counter()
    for _ in range(10):
        a @ a
    return 10 * 2 * 2048**3 / (time.perf_counter() - started)


def main(steps: int) -> dict:
    results: dict = {"matmul_gflops": round(matmul_flops() / 1e9, 1), "per_factor": {}}
    for factor in (1, 4, 8, 16):
        params, stage, module, images, latents, cond = setup(factor)
        batch = params.ldm.batch_size
        row: dict = {
            "latent": list(latents.shape[1:]),
            "unet_params_M": round(sum(p.numel() for p in module.unet.parameters()) / 1e6, 2),
        }
        row["bare_img_per_s"] = round(bare_loop(module, latents, cond, batch, steps), 2)
        flops = flops_per_step(module, latents[:batch], cond[:batch])
        row["gflop_per_step"] = round(flops / 1e9, 2)
        row["hardware_fraction"] = round(flops * row["bare_img_per_s"] / batch / (results["matmul_gflops"] * 1e9), 3)
        if factor in (4, 8):

            def encode(i, j, images=images, stage=stage):
                with torch.no_grad():
                    return stage.encode(to_float(images[i:j]))

            row["encode_each_batch_img_per_s"] = round(bare_loop(module, latents, cond, batch, steps, encode), 2)
            row["cache_speedup"] = round(row["bare_img_per_s"] / row["encode_each_batch_img_per_s"], 2)
        if factor == 8:
            row["platform_img_per_s"] = round(platform(params, module, latents, cond, steps), 2)
            row["platform_over_bare"] = round(row["platform_img_per_s"] / row["bare_img_per_s"], 3)
        results["per_factor"][factor] = row
        print(factor, row, flush=True)
    pf = results["per_factor"]
    results["latent_f8_over_pixel_f1"] = round(pf[8]["bare_img_per_s"] / pf[1]["bare_img_per_s"], 2)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    results = main(parser.parse_args().steps)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "ldm.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
