"""Image conversions, in one place: uint8 tensors (what data/ holds and metrics read), the
[-1, 1] floats every network sees, and PIL images for grids."""

from __future__ import annotations

import torch
from PIL import Image


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> floats in [-1, 1]."""
    return images.float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] (clamped) -> uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """uint8 [N, 3, H, W] -> one RGB PIL image each."""
    return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
