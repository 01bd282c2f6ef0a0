"""Autoencoder benchmarks (issue: autoencoder stage).

    python benchmarks/autoencoder.py throughput   # img/s per f, smoke and default settings, 64 px
    python benchmarks/autoencoder.py quality      # every f for the sweep's per-factor budget: PSNR table
    python benchmarks/autoencoder.py ablation --factor 8 --minutes 1.5   # each recipe choice undone in turn
    python benchmarks/autoencoder.py bare --factor 32   # the issue's plain recipe, outside the platform

Run from the repository root with the virtual environment active, after `latentlab data`.
``quality`` trains through the real flow (MLflow, registry, reuse), so a second call only reads
the finished runs; ``--minutes`` overrides the sweep's budget. ``ablation`` trains the first
stage directly (no MLflow) for the same wall time per variant and measures per-image PSNR on
the val split. Results are printed as Markdown and written to reports/benchmarks/.
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import pairwise
from pathlib import Path

from components.autoencoder_training import AutoencoderModule
from components.dataset import load_split
from components.presets import load_params
from components.workspace import DATA_DIR

FACTORS = (2, 4, 8, 16, 32)
OUT = Path("reports/benchmarks")


def throughput(steps: int = 4) -> list[dict]:
    images, _ = load_split(DATA_DIR, "train")
    rows = []
    for preset in ("smoke", "default"):
        for factor in FACTORS:
            params = load_params(
                f"params/{preset}.yaml", [f"ae.factor={factor}", "data.resolution=64", "ae.disc_start=0"]
            )
            module = AutoencoderModule(params.ae.model_dump(mode="json"), 64)
            optimizers = module.configure_optimizers()
            module.optimizers = lambda o=optimizers: o
            module.manual_backward = lambda loss: loss.backward()
            module.log = lambda *a, **k: None
            batch = (images[: params.ae.batch_size],)
            module.training_step(batch, 0)  # warm-up
            started = time.perf_counter()
            for _ in range(steps):
                module.training_step(batch, 0)
            rate = steps * params.ae.batch_size / (time.perf_counter() - started)
            rows.append(
                {
                    "preset": preset,
                    "factor": factor,
                    "batch": params.ae.batch_size,
                    "img_per_s": round(rate, 1),
                    "params_M": round(sum(p.numel() for p in module.stage.parameters()) / 1e6, 2),
                }
            )
            print(rows[-1], flush=True)
    return rows


# The first stage before issue 12, and each of its choices undone in turn from the current one.
VARIANTS = {
    "current defaults": [],
    "before (all of the below)": [
        "ae.adam_betas=[0.5, 0.9]",
        "ae.channels_per_group=1",
        "ae.kl_weight=0.012288",  # 1e-6 per latent sum vs a per-pixel L1 at 64 px: 1e-6 * 3 * 64 * 64
        "ae.disc_start=200",
        "ae.lr=3e-4",
        "ae.precision=32-true",
        "ae.channels_last=false",
        "ae.pixel_loss=l1",
    ],
    "L1 pixel loss (the paper)": ["ae.pixel_loss=l1"],
    "Adam (0.5, 0.9)": ["ae.adam_betas=[0.5, 0.9]"],
    "1 channel per GroupNorm group": ["ae.channels_per_group=1"],
    "KL weight in the old units": ["ae.kl_weight=0.012288"],
    "discriminator from step 200": ["ae.disc_start=200"],
    "lr 3e-4": ["ae.lr=3e-4"],
    "fp32, NCHW": ["ae.precision=32-true", "ae.channels_last=false"],
    "cosine lr decay over the budget": ["ae.lr_schedule=cosine"],
    "batch 16": ["ae.batch_size=16"],
    "lr 2e-3": ["ae.lr=2e-3"],
    "cosine, lr 2e-3": ["ae.lr_schedule=cosine", "ae.lr=2e-3"],
    "batch 4": ["ae.batch_size=4"],
    "wider deep levels [1,2,4,4,8,8]": ["ae.channel_mult=[1, 2, 4, 4, 8, 8]"],
    "wider deep levels, cosine": ["ae.channel_mult=[1, 2, 4, 4, 8, 8]", "ae.lr_schedule=cosine"],
}


def ablation(factor: int, minutes: float, variants: list[str] | None = None) -> list[dict]:
    import tempfile

    from components.autoencoder_training import train_autoencoder
    from components.metrics import psnr_ssim

    train, _ = load_split(DATA_DIR, "train")
    val, _ = load_split(DATA_DIR, "val")
    rows = []
    for name, overrides in VARIANTS.items():
        if variants and name not in variants:
            continue
        settings = [f"ae.factor={factor}", f"ae.max_minutes={minutes}", "ae.max_steps=1000000", *overrides]
        params = load_params("params/default.yaml", settings)
        with tempfile.TemporaryDirectory() as tmp:
            module = train_autoencoder(
                params.ae, train, resolution=params.data.resolution, checkpoint_dir=Path(tmp), seed=params.seed
            )
        metrics = psnr_ssim(val, module.reconstruct_uint8(val))
        rows.append(
            {
                "variant": name,
                "factor": factor,
                "steps": int(module.steps),
                "psnr": round(metrics["psnr"], 2),
                "psnr_pooled": round(metrics["psnr_pooled"], 2),
                "ssim": round(metrics["ssim"], 3),
            }
        )
        print(rows[-1], flush=True)
    return rows


def quality(minutes: float | None = None) -> list[dict]:
    import mlflow

    from flows.pipeline import autoencoder_flow

    rows = []
    for factor in FACTORS:
        sweep = load_params("params/default.yaml").sweep
        budget = [f"ae.max_minutes={minutes or sweep.ae_minutes}", "ae.max_steps=1000000"]
        params = load_params("params/default.yaml", [f"ae.factor={factor}", *budget])
        result = autoencoder_flow(params)
        run = mlflow.get_run(result.autoencoder_run)
        m = run.data.metrics
        rows.append(
            {
                "factor": factor,
                "latent_channels": run.data.params.get("ae.latent_channels"),
                "steps": int(m.get("images_seen", 0)) // params.ae.batch_size,
                "psnr": round(m["psnr"], 2),
                "psnr_pooled": round(m.get("psnr_pooled", float("nan")), 2),
                "ssim": round(m["ssim"], 3),
                "rfid": round(m["rfid"], 3),
                "run_id": result.run_id,
            }
        )
        print(rows[-1], flush=True)
    psnr = [r["psnr"] for r in rows]
    print("PSNR falls as f grows:", all(a > b for a, b in pairwise(psnr)))
    return rows


def bare(minutes: float | None = None, factors: tuple[int, ...] = FACTORS) -> list[dict]:
    """The issue's recipe outside the platform, for the sweep's per-factor minutes: a diffusers
    ``AutoencoderKL`` (width 16, 4 channels per group, KL channels as CompVis), L1 + KL summed
    per image pixel as CompVis (weight 1e-6), Adam (0.9, 0.999) at 1e-3, batch 16, bf16 autocast,
    channels_last, no discriminator, no perceptual term; a plain loop timed around its steps.
    What the platform's PSNR is to be held against."""
    import torch
    from diffusers import AutoencoderKL

    from components.first_stage import DEFAULT_LATENT_CHANNELS
    from components.images import to_float, to_uint8
    from components.metrics import psnr_ssim

    train, _ = load_split(DATA_DIR, "train")
    val, _ = load_split(DATA_DIR, "val")
    seconds = 60 * (minutes or load_params("params/default.yaml").sweep.ae_minutes)
    rows = []
    for factor in factors:
        torch.manual_seed(0)
        levels = factor.bit_length()
        net = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=tuple(16 * m for m in (1, 2, 4, 4, 4, 4)[:levels]),
            latent_channels=DEFAULT_LATENT_CHANNELS["kl"][factor],
            norm_num_groups=4,
            sample_size=64,
        ).to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.999))
        generator = torch.Generator().manual_seed(0)
        steps, spent = 0, 0.0
        while spent < seconds:
            started = time.perf_counter()
            x = to_float(train[torch.randint(len(train), (16,), generator=generator)])
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", torch.bfloat16):
                posterior = net.encode(x).latent_dist
                image = net.decode(posterior.sample()).sample
                loss = (image.float() - x).abs().mean() + 1e-6 * posterior.kl().sum() / x.numel()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps, spent = steps + 1, spent + time.perf_counter() - started
        net.eval()
        with torch.no_grad():
            parts = [to_uint8(net.decode(net.encode(to_float(c)).latent_dist.mode()).sample) for c in val.split(64)]
        metrics = psnr_ssim(val, torch.cat(parts))
        rows.append({"factor": factor, "steps": steps, **{k: round(v, 3) for k, v in metrics.items()}})
        print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["throughput", "quality", "ablation", "bare"])
    parser.add_argument("--minutes", type=float, default=None, help="training minutes per run")
    parser.add_argument("--factor", type=int, default=None, help="ablation: which f (8); bare: only this f")
    parser.add_argument("--variants", nargs="*", help="ablation: only these (names as in VARIANTS)")
    args = parser.parse_args()
    if args.what == "throughput":
        rows = throughput()
    elif args.what == "bare":
        rows = bare(args.minutes, (args.factor,) if args.factor else FACTORS)
    elif args.what == "quality":
        rows = quality(args.minutes)
    else:
        args.factor = args.factor or 8
        rows = ablation(args.factor, args.minutes or 1.5, args.variants)
    OUT.mkdir(parents=True, exist_ok=True)
    name = args.what if args.what != "ablation" or not args.variants else f"ablation-f{args.factor}"
    (OUT / f"autoencoder-{name}.json").write_text(json.dumps(rows, indent=2))
    (OUT / f"autoencoder-{name}.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))
