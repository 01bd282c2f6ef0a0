"""Training speed by precision, and the platform's loops against bare ones (issue 12).

    python benchmarks/precision.py            # f = 4, 8, 16; 64 px; default params
    python benchmarks/precision.py --steps 10

For each factor, on random data shaped like the default preset's:

1. bf16 vs fp32: img/s of a bare training step (forward, loss, backward, Adam) of the first
   stage (AutoencoderKL, the pixel loss + 1 - SSIM + KL; bf16 autocast + channels_last vs fp32 NCHW) and of the LDM UNet
   (the default diffusion loss; bf16 autocast vs fp32), the two steps alternating on two copies of
   the model. The tables in ``components.precision`` (what ``precision: auto`` follows) come from this.
2. platform / bare: latentlab's Lightning loop (``train_autoencoder``, ``train_ldm``: budget,
   checkpoints, EMA) over a bare step of the same model, batch and precision. The two are timed
   in pairs: after each of the platform's training batches (as its ``Budget`` times them,
   ``module.train_seconds``) one bare step runs on its own copy of the model, in the same process
   and the same second. Goal: >= 0.95.

Rates are the batch over the median step time, so a stray slow step (another process, the
allocator, a checkpoint) does not decide a ratio. Timing the two loops one after the other did
not work on this shared 2-core machine: the same bare loop ran 15-25 % apart between two passes
a minute apart, more than the difference to be measured; paired steps see the same machine.

All ratios come from one run of this script; results in reports/benchmarks/precision.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import pytorch_lightning as L
import torch

from components.autoencoder_training import train_autoencoder
from components.conditioning import Conditioner
from components.diffusion import LatentDiffusionModule
from components.first_stage import build_first_stage
from components.images import to_float
from components.ldm_training import train_ldm
from components.losses import PerceptualLoss
from components.precision import decide
from components.presets import load_params

OUT = Path("reports/benchmarks")
# Steps before timing starts: the first steps of a process run up to 20 % slower (allocator,
# OpenMP pools), which with two warm-up steps made whichever loop ran first look slow.
WARMUP = 10


def alternating(first, second, steps: int, batch: int) -> tuple[float, float]:
    """img/s of ``first()`` and of ``second()`` at their median times, called in turn (so both
    see the same machine), after ``WARMUP`` calls each."""
    for _ in range(WARMUP):
        first(), second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(steps):
        for step, spent in zip((first, second), times, strict=True):
            started = time.perf_counter()
            step()
            spent.append(time.perf_counter() - started)
    return tuple(batch / statistics.median(spent) for spent in times)


class PairedSteps(L.Callback):
    """Each platform training batch's share of ``module.train_seconds`` (as the platform's
    ``Budget``, which runs before this callback, timed it), each followed by one timed
    ``bare_step()``."""

    def __init__(self, bare_step):
        self.bare_step = bare_step
        self.platform: list[float] = []
        self.bare: list[float] = []
        self._before = 0.0

    def on_train_batch_start(self, trainer, module, *_) -> None:
        self._before = float(module.train_seconds)

    def on_train_batch_end(self, trainer, module, *_) -> None:
        self.platform.append(float(module.train_seconds) - self._before)
        started = time.perf_counter()
        self.bare_step()
        self.bare.append(time.perf_counter() - started)

    def rates(self, batch: int) -> tuple[float, float]:
        """(platform, bare) img/s at the median step time, after the warm-up steps."""
        return tuple(batch / statistics.median(times[WARMUP:]) for times in (self.platform, self.bare))


def bare_autoencoder_step(params, images: torch.Tensor, bf16: bool):
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
            error = out.image - x  # the platform's pixel term (ae.pixel_loss)
            pixel = error.abs().mean() if params.ae.pixel_loss == "l1" else error.square().mean()
            reconstruction = pixel + params.ae.perceptual_weight * perceptual(out.image, x)
            loss = reconstruction + params.ae.kl_weight * out.regularization
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def ldm_module(params, factor: int) -> tuple[LatentDiffusionModule, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    channels, size, _ = build_first_stage(params.ae, 64).latent_shape(64)
    conditioner = Conditioner("class", 11, params.ldm.context_dim)
    module = LatentDiffusionModule(params.ldm.model_dump(mode="json"), channels, size, 11, conditioner)
    n = params.ldm.batch_size * 4
    return module, torch.randn(n, channels, size, size), torch.randint(0, 11, (n,))


def bare_ldm_step(module: LatentDiffusionModule, latents, cond, batch: int, bf16: bool):
    optimizer = module.configure_optimizers()

    def step():
        optimizer.zero_grad(set_to_none=True)  # first, as Lightning's automatic optimisation does
        with torch.autocast("cpu", torch.bfloat16) if bf16 else nullcontext():
            loss = module.loss(latents[:batch], cond[:batch])
        loss.backward()
        optimizer.step()
        module.ema.step(module.unet.parameters())

    return step


def main(steps: int) -> dict:
    results: dict = {}
    for factor in (4, 8, 16):
        params = load_params("params/default.yaml", [f"ae.factor={factor}", f"ae.max_steps={steps + WARMUP}"])
        params = params.model_copy(update={"ldm": params.ldm.model_copy(update={"max_steps": steps + WARMUP})})
        images = torch.randint(0, 256, (params.ae.batch_size * 16, 3, 64, 64), dtype=torch.uint8)
        row = {}
        row["ae_fp32_img_per_s"], row["ae_bf16_img_per_s"] = alternating(
            bare_autoencoder_step(params, images, False),
            bare_autoencoder_step(params, images, True),
            steps,
            params.ae.batch_size,
        )
        fp32_module, latents, cond = ldm_module(params, factor)
        bf16_module, _, _ = ldm_module(params, factor)
        batch = params.ldm.batch_size
        row["ldm_fp32_img_per_s"], row["ldm_bf16_img_per_s"] = alternating(
            bare_ldm_step(fp32_module, latents, cond, batch, False),
            bare_ldm_step(bf16_module, latents, cond, batch, True),
            steps,
            batch,
        )
        ae_decided, ldm_decided = decide("auto", "autoencoder"), decide("auto", "ldm", latents.shape[-1])
        ae_precision, ldm_precision = ae_decided.value, ldm_decided.value
        ae_bf16, ldm_bf16 = ae_precision == "bf16-mixed", ldm_precision == "bf16-mixed"
        with tempfile.TemporaryDirectory() as tmp:
            ae_pairs = PairedSteps(bare_autoencoder_step(params, images, ae_bf16))
            train_autoencoder(
                params.ae, images, resolution=64, checkpoint_dir=Path(tmp) / "ae", seed=0, callbacks=[ae_pairs]
            )
            bare_module, latents, cond = ldm_module(params, factor)
            ldm_pairs = PairedSteps(bare_ldm_step(bare_module, latents, cond, params.ldm.batch_size, ldm_bf16))
            module, latents, cond = ldm_module(params, factor)
            train_ldm(
                module, params.ldm, latents, cond, checkpoint_dir=Path(tmp) / "ldm", seed=0, callbacks=[ldm_pairs]
            )
        row["ae_platform_img_per_s"], row["ae_paired_bare_img_per_s"] = ae_pairs.rates(params.ae.batch_size)
        row["ldm_platform_img_per_s"], row["ldm_paired_bare_img_per_s"] = ldm_pairs.rates(params.ldm.batch_size)
        row |= {
            "ae_bf16_over_fp32": row["ae_bf16_img_per_s"] / row["ae_fp32_img_per_s"],
            "ldm_bf16_over_fp32": row["ldm_bf16_img_per_s"] / row["ldm_fp32_img_per_s"],
            "ae_platform_over_bare": row["ae_platform_img_per_s"] / row["ae_paired_bare_img_per_s"],
            "ldm_platform_over_bare": row["ldm_platform_img_per_s"] / row["ldm_paired_bare_img_per_s"],
            "precision": {"autoencoder": ae_precision, "ldm": ldm_precision},
            "precision_rule": {"autoencoder": ae_decided.rule, "ldm": ldm_decided.rule},
        }
        results[factor] = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
        print(factor, results[factor], flush=True)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    results = main(parser.parse_args().steps)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "precision.json").write_text(json.dumps(results, indent=2))
