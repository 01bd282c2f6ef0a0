"""The latent cache: each image encoded once per first stage, scaled to unit variance.

The paper's ``scale_by_std``: latents are multiplied by 1 / std(latents of the first batch), so
the diffusion model sees roughly unit variance whatever f. The factor is stored with the cache
and written into the exported pipeline's first-stage config (``scaling_factor``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.progress import track
from safetensors.torch import load_file, save_file

from components.autoencoders import FirstStage


@torch.no_grad()
def encode_images(stage: FirstStage, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> unscaled latents [N, c, H/f, W/f] (KL mode, VQ before quantisation)."""
    stage.eval()
    chunks = images.split(batch_size)
    return torch.cat([stage.encode(c.float() / 127.5 - 1) for c in track(chunks, "Encoding latents", transient=True)])


def scale_factor(latents: torch.Tensor, first_batch: int = 64) -> float:
    return float(1.0 / latents[:first_batch].flatten().std())


def cached_latents(cache_file: Path, stage: FirstStage, splits: dict[str, torch.Tensor]) -> tuple[dict, float]:
    """Scaled latents per split, from ``cache_file`` or encoded now and saved there."""
    cache_file = Path(cache_file)
    if cache_file.exists():
        stored = load_file(cache_file)
        return {k: v for k, v in stored.items() if k != "scale_factor"}, float(stored["scale_factor"])
    raw = {name: encode_images(stage, images) for name, images in splits.items()}
    scale = 1.0 if not stage.trainable else scale_factor(raw["train"])
    latents = {name: (z * scale).contiguous() for name, z in raw.items()}
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    partial = cache_file.with_suffix(".partial")
    save_file({**latents, "scale_factor": torch.tensor(scale)}, partial)
    partial.replace(cache_file)
    return latents, scale
