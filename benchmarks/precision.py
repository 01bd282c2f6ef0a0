"""Training speed by precision, and the platform's loops against bare ones (issue 12).

    python benchmarks/precision.py            # f = 4, 8, 16; 64 px; default params
    python benchmarks/precision.py --steps 10

For each factor, on random data shaped like the default preset's:

1. bf16 vs fp32: img/s of a bare training step (forward, loss, backward, Adam) of the first
   stage (AutoencoderKL, L1 + 1 - SSIM + KL; bf16 autocast + channels_last vs fp32 NCHW) and of the LDM UNet
   (epsilon L2; bf16 autocast vs fp32). This is what ``components.training.bf16_pays`` is
   decided from.
2. platform / bare: img/s of latentlab's Lightning loop (``train_autoencoder``, ``train_ldm``:
   budget, checkpoints, EMA) counted over its training batches (``module.train_seconds``), over
   the bare step at the same precision. Goal: >= 0.95.

All ratios come from one run of this script; results in reports/benchmarks/precision.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from components.autoencoder_training import train_autoencoder
from components.conditioning import Conditioner
from components.diffusion import LatentDiffusionModule
from components.first_stage import build_first_stage
from components.images import to_float
from components.ldm_training import train_ldm
from components.losses import PerceptualLoss
from components.params import load_params
from components.training import resolve_precision

OUT = Path("reports/benchmarks")


def timed(step, steps: int, batch: int) -> float:
    """img/s of ``step()`` after two warm-up calls."""
    step(), step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - started)


def bare_autoencoder(params, images: torch.Tensor, bf16: bool, steps: int) -> float:
    torch.manual_seed(0)
    stage = build_first_stage(params.ae, 64).train()
    if bf16:
        stage = stage.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(stage.parameters(), lr=params.ae.lr, betas=tuple(params.ae.adam_betas))
    perceptual = PerceptualLoss("ssim")  # the platform's loss without VGG weights on disk
    x = to_float(images[: params.ae.batch_size])
    x = x.contiguous(memory_format=torch.channels_last) if bf16 else x

    def step():
        with torch.autocast("cpu", torch.bfloat16) if bf16 else nullcontext():
            out = stage.reconstruct(x)
            reconstruction = (out.image - x).abs().mean() + params.ae.perceptual_weight * perceptual(out.image, x)
            loss = reconstruction + params.ae.kl_weight * out.regularization
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return timed(step, steps, params.ae.batch_size)


def ldm_module(params, factor: int) -> tuple[LatentDiffusionModule, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    channels, size, _ = build_first_stage(params.ae, 64).latent_shape(64)
    conditioner = Conditioner("class", 11, params.ldm.context_dim)
    module = LatentDiffusionModule(params.ldm.model_dump(mode="json"), channels, size, 11, conditioner)
    n = params.ldm.batch_size * 4
    return module, torch.randn(n, channels, size, size), torch.randint(0, 11, (n,))


def bare_ldm(module: LatentDiffusionModule, latents, cond, batch: int, bf16: bool, steps: int) -> float:
    optimizer = module.configure_optimizers()

    def step():
        with torch.autocast("cpu", torch.bfloat16) if bf16 else nullcontext():
            loss = module.loss(latents[:batch], cond[:batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        module.ema.step(module.unet.parameters())

    return timed(step, steps, batch)


def platform_rate(module, batch: int) -> float:
    return int(module.steps) * batch / float(module.train_seconds)


def main(steps: int) -> dict:
    results: dict = {}
    for factor in (4, 8, 16):
        params = load_params("params/default.yaml", [f"ae.factor={factor}", f"ae.max_steps={steps + 2}"])
        params = params.model_copy(update={"ldm": params.ldm.model_copy(update={"max_steps": steps + 2})})
        images = torch.randint(0, 256, (params.ae.batch_size * 4, 3, 64, 64), dtype=torch.uint8)
        row = {
            "ae_fp32_img_per_s": bare_autoencoder(params, images, False, steps),
            "ae_bf16_img_per_s": bare_autoencoder(params, images, True, steps),
        }
        module, latents, cond = ldm_module(params, factor)
        row["ldm_fp32_img_per_s"] = bare_ldm(module, latents, cond, params.ldm.batch_size, False, steps)
        row["ldm_bf16_img_per_s"] = bare_ldm(module, latents, cond, params.ldm.batch_size, True, steps)
        ae_precision = resolve_precision("auto", "autoencoder")
        ldm_precision = resolve_precision("auto", "ldm", latents.shape[-1])
        with tempfile.TemporaryDirectory() as tmp:
            trained = train_autoencoder(params.ae, images, resolution=64, checkpoint_dir=Path(tmp) / "ae", seed=0)
            row["ae_platform_img_per_s"] = platform_rate(trained, params.ae.batch_size)
            module, latents, cond = ldm_module(params, factor)
            train_ldm(module, params.ldm, latents, cond, checkpoint_dir=Path(tmp) / "ldm", seed=0)
            row["ldm_platform_img_per_s"] = platform_rate(module, params.ldm.batch_size)
        bare_ae = row["ae_bf16_img_per_s" if ae_precision == "bf16-mixed" else "ae_fp32_img_per_s"]
        bare_ldm_rate = row["ldm_bf16_img_per_s" if ldm_precision == "bf16-mixed" else "ldm_fp32_img_per_s"]
        row |= {
            "ae_bf16_over_fp32": row["ae_bf16_img_per_s"] / row["ae_fp32_img_per_s"],
            "ldm_bf16_over_fp32": row["ldm_bf16_img_per_s"] / row["ldm_fp32_img_per_s"],
            "ae_platform_over_bare": row["ae_platform_img_per_s"] / bare_ae,
            "ldm_platform_over_bare": row["ldm_platform_img_per_s"] / bare_ldm_rate,
            "precision": {"autoencoder": ae_precision, "ldm": ldm_precision},
        }
        results[factor] = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
        print(factor, results[factor], flush=True)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    results = main(parser.parse_args().steps)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "precision.json").write_text(json.dumps(results, indent=2))
