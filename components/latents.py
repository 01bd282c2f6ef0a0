"""The latent cache: the dataset encoded once per first stage, as the denoiser trains on it.

Latents are scaled by the first stage's own scale (``FirstStage.encode_images``), so the cache
holds exactly what the diffusion model sees.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from components.first_stage import FirstStage


def cached_latents(cache_file: Path, stage: FirstStage, splits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scaled latents per split (uint8 images in ``splits``), from ``cache_file`` or encoded now."""
    cache_file = Path(cache_file)
    if cache_file.exists():
        return load_file(cache_file)
    latents = {name: stage.encode_images(images, progress=True).contiguous() for name, images in splits.items()}
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    partial = cache_file.with_suffix(".partial")
    save_file(latents, partial)
    partial.replace(cache_file)
    return latents
