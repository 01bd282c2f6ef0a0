"""The denoiser's task (``ldm.task``): what it sees beside the noisy latent, and how its outputs
are judged.

generate: nothing; it turns noise into images. superres and inpaint condition by concatenation
(CompVis ``conditioning_key: concat``): an image stacked on the noisy latent's channels at the
latent's spatial size, so every factor f is given the same input, resampled to its latent.

- superres: the image downscaled ``ldm.superres_scale`` times (bicubic, antialiased; or blurred
  and noised as well, a light BSR-style degradation), resized to the latent: 3 channels. At f=4
  and x4 no resizing is needed (the paper's setting); at f=1 it is upsampled, at f>4 downsampled.
- inpaint: the mask (1 where the image is to be filled; area-resized, so a latent cell holds the
  share of it that is a hole) and the first stage's encoding of the masked image (holes grey):
  1 + latent channels, in the order diffusers' StableDiffusionInpaintPipeline stacks them.
  CompVis's inpaint.py and diffusers resize the mask nearest instead: at f=4 a cell is 4 px, but
  on this sweep's 64 px images a cell at f=16 or 32 is 16-32 px, and nearest would call a cell
  whole or empty by one pixel of it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from components.images import to_float, to_uint8

if TYPE_CHECKING:  # (types only: the model and data code stays below the stages)
    from components.first_stage import FirstStage
    from components.params import LDMParams

GREY = 128  # what a hole holds: 0 in [-1, 1], as diffusers masks images (CompVis's inpaint.py: -1, black)


@dataclass
class TaskInputs:
    """What one task gives the denoiser for a batch of images (all None for generate)."""

    concat: torch.Tensor | None  # stacked on the noisy latent: [N, c, h, w] at the latent's size
    shown: torch.Tensor | None  # uint8, the input as a person sees it: bicubic-upsampled low-res, masked image
    masks: torch.Tensor | None  # inpaint: [N, 1, H, W], 1 where the image is filled

    @classmethod
    def nothing(cls) -> TaskInputs:
        """What generation is given: nothing beside the noise."""
        return cls(None, None, None)


def condition_channels(ldm: LDMParams, latent_channels: int) -> int:
    """Channels the task stacks on a latent of ``latent_channels``."""
    return {"generate": 0, "superres": 3, "inpaint": 1 + latent_channels}[ldm.task]


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[-1, 1] images to ``size``: bicubic, antialiased when shrinking (no aliasing at f=32)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def low_resolution(images: torch.Tensor, scale: int, degradation: str, generator: torch.Generator) -> torch.Tensor:
    """uint8 images -> their [-1, 1] low-resolution version, ``scale`` times smaller."""
    x = to_float(images)
    if degradation == "blur_noise":  # a Gaussian blur of random width, then noise of random strength
        sigma = float(torch.empty(()).uniform_(0.4, 1.6, generator=generator))
        radius = math.ceil(2 * sigma)
        taps = torch.exp(-(torch.arange(-radius, radius + 1) ** 2) / (2 * sigma**2))
        taps = (taps / taps.sum()).to(x)
        x = F.pad(x, (radius,) * 4, mode="reflect")
        x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
        x = F.conv2d(x, taps.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    height, width = images.shape[-2:]
    low = resize(x, (height // scale, width // scale))
    if degradation == "blur_noise":
        strength = torch.empty(len(low), 1, 1, 1).uniform_(0, 0.05, generator=generator)
        low = (low + strength * torch.randn(low.shape, generator=generator)).clamp(-1, 1)
    return low


@functools.lru_cache(maxsize=4)
def seeded_masks(n: int, size: tuple[int, int], kind: str, seed: int) -> torch.Tensor:
    """``draw_masks`` from ``seed``, drawn once per process: a sweep's factors share one seed's
    masks (4,000 stroke masks take ~14 s of Python loops). Read-only: callers never write to it."""
    return draw_masks(n, size, kind, torch.Generator().manual_seed(seed))


def draw_masks(n: int, size: tuple[int, int], kind: str, generator: torch.Generator) -> torch.Tensor:
    """``n`` random holes [n, 1, H, W] (1: to fill): boxes covering 10-50 % of the image,
    free-form strokes (thick random walks, as LaMa's and the paper's), or either at random."""
    height, width = size
    masks = torch.zeros(n, 1, height, width)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    for mask in masks:
        draw = kind if kind != "mixed" else ("boxes", "strokes")[int(torch.randint(2, (), generator=generator))]
        if draw == "boxes":
            area = float(torch.empty(()).uniform_(0.1, 0.5, generator=generator))
            aspect = float(torch.empty(()).uniform_(0.5, 2.0, generator=generator))
            h = max(1, min(height, round(height * math.sqrt(area * aspect))))
            w = max(1, min(width, round(width * math.sqrt(area / aspect))))
            top = int(torch.randint(height - h + 1, (), generator=generator))
            left = int(torch.randint(width - w + 1, (), generator=generator))
            mask[0, top : top + h, left : left + w] = 1
            continue
        radius = max(1.0, min(height, width) / 12)
        for _ in range(int(torch.randint(1, 4, (), generator=generator))):
            y, x = (float(torch.rand((), generator=generator)) * s for s in (height, width))
            for _ in range(int(torch.randint(4, 10, (), generator=generator))):
                angle = float(torch.rand((), generator=generator)) * 2 * math.pi
                length = float(torch.empty(()).uniform_(0.1, 0.3, generator=generator)) * max(height, width)
                end_y = min(max(y + length * math.sin(angle), 0.0), height - 1.0)
                end_x = min(max(x + length * math.cos(angle), 0.0), width - 1.0)
                mask[0][_near_segment(ys, xs, (y, x), (end_y, end_x), radius)] = 1
                y, x = end_y, end_x
    return masks


def _near_segment(
    ys: torch.Tensor, xs: torch.Tensor, start: tuple[float, float], end: tuple[float, float], radius: float
) -> torch.Tensor:
    """Pixels within ``radius`` of the segment ``start``-``end``: one brush stroke."""
    (y0, x0), (y1, x1) = start, end
    dy, dx = y1 - y0, x1 - x0
    t = (((ys - y0) * dy + (xs - x0) * dx) / max(dy * dy + dx * dx, 1e-9)).clamp(0, 1)
    return (ys - y0 - t * dy) ** 2 + (xs - x0 - t * dx) ** 2 <= radius**2


def with_holes(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """uint8 images with their masked pixels grey."""
    return torch.where(masks.bool(), torch.full_like(images, GREY), images)


def task_inputs(
    ldm: LDMParams,
    images: torch.Tensor,
    stage: FirstStage,
    seed: int,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> TaskInputs:
    """The task's inputs for uint8 ``images`` (the high-resolution, complete ones), drawn from
    ``seed`` (degradation, masks). ``encode``: how masked images become scaled latents (default:
    ``stage.encode_images``; training passes a cached one)."""
    if ldm.task == "superres":
        generator = torch.Generator().manual_seed(seed)
        low = low_resolution(images, ldm.superres_scale, ldm.superres_degradation, generator)
        return superres_inputs(low, tuple(images.shape[-2:]), stage)
    if ldm.task == "inpaint":
        masks = seeded_masks(len(images), tuple(images.shape[-2:]), ldm.inpaint_masks, seed)
        return inpaint_inputs(images, masks, stage, encode)
    return TaskInputs.nothing()


def superres_inputs(low: torch.Tensor, size: tuple[int, int], stage: FirstStage) -> TaskInputs:
    """Super-resolution of [-1, 1] low-resolution images to ``size`` pixels: the image at the
    latent's size of the output."""
    latent = (size[0] // stage.factor, size[1] // stage.factor)
    shown = to_uint8(resize(low, size))  # bicubic: also the baseline to beat
    return TaskInputs(resize(low, latent), shown, None)


def inpaint_inputs(
    images: torch.Tensor,
    masks: torch.Tensor,
    stage: FirstStage,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> TaskInputs:
    """Inpainting of uint8 ``images`` where ``masks`` [N, 1, H, W] is 1: the mask's share of each
    latent cell, then the encoded masked image."""
    holed = with_holes(images, masks)
    latents = (encode or stage.encode_images)(holed)
    small = F.interpolate(masks, size=latents.shape[-2:], mode="area")
    return TaskInputs(torch.cat([small, latents], dim=1), holed, masks)


def complete(outputs: torch.Tensor, originals: torch.Tensor, inputs: TaskInputs) -> torch.Tensor:
    """What the task delivers: inpainting keeps the known pixels and takes only the holes from the
    model (as CompVis' ``scripts/inpaint.py``); the other tasks deliver the outputs."""
    if inputs.masks is None:
        return outputs
    return torch.where(inputs.masks.bool(), outputs, originals)
