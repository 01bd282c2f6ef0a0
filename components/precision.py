"""The one owner of ``precision: auto``: bf16 autocast or fp32, and the rule that chose it.

The f-ablation compares factors at equal training time, so a faster step is more training.
On a 2-core CPU bf16 autocast is faster only where the processor has bf16 instructions *and*
the model's matmuls are big enough to win back the casts. That was measured on the two
processors this project runs on (``python benchmarks/precision.py``, default widths, 64 px),
and their tables decide there. Anywhere else a short measurement on the processor itself
decides, cached per processor, torch version, model and size under ``.latentlab/``
(``workspace.precision_cache``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from components.machine import BF16_FLAGS, NO_BF16, processor_id
from components.workspace import precision_cache, write_atomically

BF16, FP32 = "bf16-mixed", "32-true"
SECTION = {"autoencoder": "ae", "ldm": "ldm"}  # the params section holding each model's precision
MIN_SPEEDUP = 1.05  # below this, a short measurement's noise on a shared 2-core machine
MEASURE_STEPS = 5  # timed steps per precision: 1.5-6.5 s here (measure_bf16)


@dataclass(frozen=True)
class Precision:
    value: str  # "bf16-mixed" | "32-true" | what the user asked for
    rule: str  # one line saying which rule chose it


@dataclass(frozen=True)
class Table:
    """bf16 over fp32 training speed measured on one processor (benchmarks/precision.py)."""

    name: str
    autoencoder: str  # the speed-ups at f = 4, 8, 16: bf16 paid at every factor
    ldm: dict[int, float]  # latent size -> speed-up: pays from 16x16, where matmuls outweigh casts


# 2-core Xeon with AMX-BF16: autoencoder 1.28-1.43x at f = 4..16; LDM UNet 1.19x on 16x16
# latents, 0.92x on 8x8, 0.86x on 4x4.
XEON_AMX = Table("Xeon with AMX-BF16", "1.28-1.43x", {16: 1.19, 8: 0.92, 4: 0.86})
# 2-core AMD EPYC Zen 4 (AVX-512 BF16, no AMX): autoencoder 1.43, 1.28, 1.29x at f = 4, 8, 16;
# LDM 1.20x on 16x16, 0.95x on 8x8, 0.92x on 4x4. Same conclusion as the Xeon.
EPYC_ZEN4 = Table("EPYC with AVX-512 BF16", "1.28-1.43x", {16: 1.20, 8: 0.95, 4: 0.92})


def _parse(processor: str) -> tuple[str, set[str]]:
    """(model name, bf16 flags) of a ``processor_id``."""
    match = re.fullmatch(r"(.*) \[(.*)\]", processor)
    if not match or match.group(2) == NO_BF16:
        return (match.group(1) if match else processor), set()
    return match.group(1), set(match.group(2).split()) & set(BF16_FLAGS)


def measured_table(processor: str) -> Table | None:
    """The table measured on this kind of processor: an Intel Xeon with AMX-BF16, or an AMD
    EPYC with AVX-512 BF16 (Zen 4 and later). None for any other."""
    name, flags = _parse(processor)
    if "Xeon" in name and "amx_bf16" in flags:
        return XEON_AMX
    if "EPYC" in name and "avx512_bf16" in flags:
        return EPYC_ZEN4
    return None


def decide(
    requested: str,
    model: str,
    size: int = 0,
    *,
    processor: str | None = None,
    cache_dir: Path | None = None,
    steps: int = MEASURE_STEPS,
) -> Precision:
    """The precision to train ``model`` ("autoencoder" or "ldm") in, ``size`` its input side
    (LDM: the latent side; the autoencoder's table needs none). ``processor``: a
    ``processor_id`` (default: this one); a processor without a table is measured here, on
    this one, ``steps`` timed steps per precision."""
    if model not in SECTION:
        raise ValueError(f"model must be one of {sorted(SECTION)}, not {model!r}")
    if requested != "auto":
        return Precision(requested, f"asked for ({SECTION[model]}.precision={requested})")
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return Precision(BF16, "auto: CUDA GPU with bf16")
        return Precision(FP32, "auto: CUDA GPU without bf16")
    if model == "ldm" and size < 1:
        raise ValueError("the LDM's precision depends on its latent size: pass size")
    processor = processor or processor_id()
    table = measured_table(processor)
    if table is not None:
        return _from_table(table, model, size)
    name, flags = _parse(processor)
    if not flags:
        return Precision(FP32, f"auto: no bf16 instructions on {name}")
    return _measured_here(processor, model, size, Path(cache_dir or precision_cache()), steps)


def _from_table(table: Table, model: str, size: int) -> Precision:
    source = f"auto: measured table for {table.name}"
    if model == "autoencoder":
        return Precision(BF16, f"{source} (autoencoder bf16 {table.autoencoder} at f=4..16)")
    # The figure of the largest measured size not above ``size`` (else the smallest): on the
    # same side of 16x16 as ``size``, so it agrees with the decision.
    below = [s for s in table.ldm if s <= size]
    shown = max(below) if below else min(table.ldm)
    where = f"{shown}x{shown} latents" + ("" if shown == size else f", the nearest measured to {size}x{size}")
    return Precision(BF16 if size >= 16 else FP32, f"{source} (LDM bf16 {table.ldm[shown]:.2f}x on {where})")


def _measured_here(processor: str, model: str, size: int, cache_dir: Path, steps: int) -> Precision:
    """bf16 if a measurement on this processor finds it faster by more than ``MIN_SPEEDUP``,
    measured once per (processor, torch version, model, size); a cache file that cannot be read
    is measured again."""
    key = {"processor": processor, "torch": torch.__version__, "model": model, "size": size}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"{model}-{size}-{digest}.json"
    try:
        cached = json.loads(path.read_text())
        speedup = float(cached["bf16_speedup"]) if cached["key"] == key else None
    except (OSError, ValueError, KeyError, TypeError):
        speedup = None
    if speedup is None:
        speedup, seconds = measure_bf16(model, size, steps)
        # The load beside it: a measurement taken while other work ran says less (delete the file).
        record = {
            "key": key,
            "bf16_speedup": speedup,
            "steps": steps,
            "measure_s": round(seconds, 1),
            "load_average": os.getloadavg()[0],
        }
        write_atomically(path, lambda p: p.write_text(json.dumps(record, indent=2)))
    value = BF16 if speedup > MIN_SPEEDUP else FP32
    name = _parse(processor)[0]
    return Precision(value, f"auto: measured on this processor ({name}): bf16 {speedup:.2f}x, cached in {path}")


def measure_bf16(model: str, size: int, steps: int = MEASURE_STEPS) -> tuple[float, float]:
    """(fp32 over bf16-autocast median step time, seconds spent): training steps (forward,
    backward, Adam) of a small model like the project's, the two precisions alternating on two
    copies of it after a warm-up round, so both see the same (shared) machine. The autoencoder:
    a 4-level ``AutoencoderKL`` (the default f = 8 widths) on 8 images of 64 px, in NHWC as it
    trains; the LDM: a cross-attention UNet of the default widths on 16 ``size``x``size``
    4-channel latents. On the idle 2-core EPYC of the table above, 5 steps, 3 tries each: the
    autoencoder 1.31-1.75x in 1.7 s; the LDM 1.17-1.30x on 16x16 in 5.4-6.4 s, 0.93x on 8x8 in
    2.2 s, 0.87-0.92x on 4x4 in 1.5 s: its table's decisions. (Plus 4 s to import diffusers'
    models where nothing has yet; with other work on the 2 cores, steps took 5-30x longer.)"""
    started = time.perf_counter()
    build = _autoencoder_step if model == "autoencoder" else _unet_step
    fp32, bf16 = build(size, False), build(size, True)
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(steps + 1):  # the first round warms up (allocator, OpenMP pools, oneDNN kernels)
        for step, spent in zip((fp32, bf16), times, strict=True):
            begun = time.perf_counter()
            step()
            if i:
                spent.append(time.perf_counter() - begun)
    return statistics.median(times[0]) / statistics.median(times[1]), time.perf_counter() - started


def _train_step(net: torch.nn.Module, loss_of: Callable[[], torch.Tensor], bf16: bool) -> Callable[[], None]:
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _autoencoder_step(size: int, bf16: bool) -> Callable[[], None]:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    px = 64  # the project's images (at 32 px the steps are too short to time: 1.04-1.48x here)
    widths = (16, 32, 64, 64)
    net = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=widths,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=px,
    ).to(memory_format=torch.channels_last)
    x = (torch.rand(8, 3, px, px) * 2 - 1).contiguous(memory_format=torch.channels_last)

    def loss_of() -> torch.Tensor:
        posterior = net.encode(x).latent_dist
        return (net.decode(posterior.sample()).sample - x).square().mean() + 1e-6 * posterior.kl().mean()

    return _train_step(net, loss_of, bf16)


def _unet_step(size: int, bf16: bool) -> Callable[[], None]:
    # The project's own kind of UNet (cross-attention at <= 16x16, as components.diffusion builds
    # it): a plain UNet2DModel measured 1.06x at 16x16 here, where this one and the real LDM 1.18-1.20x.
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    levels = max(1, min(3, size.bit_length()))
    sizes = [max(size >> i, 1) for i in range(levels)]
    net = UNet2DConditionModel(
        sample_size=size,
        in_channels=4,
        out_channels=4,
        down_block_types=tuple("CrossAttnDownBlock2D" if s <= 16 else "DownBlock2D" for s in sizes),
        up_block_types=tuple("CrossAttnUpBlock2D" if s <= 16 else "UpBlock2D" for s in reversed(sizes)),
        block_out_channels=(64, 128, 128)[:levels],
        layers_per_block=1,
        cross_attention_dim=128,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    z, t, context = torch.randn(16, 4, size, size), torch.randint(0, 1000, (16,)), torch.randn(16, 1, 128)
    noise = torch.randn_like(z)

    def loss_of() -> torch.Tensor:
        return (net(z + noise, t, encoder_hidden_states=context).sample - noise).square().mean()

    return _train_step(net, loss_of, bf16)
