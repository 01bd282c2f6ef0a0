"""What ``latentlab sample`` computes with a trained LDM: new images at the training size or larger,
or, for a model given an image, the upscaled or filled versions of the images a user hands it.

The denoiser is convolutional, so a latent ``size`` times larger on each side gives an image
``size`` times larger (the paper's Section 4.3.2); a task's outputs take their size from the
given image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from components.artifacts import TrainedLDM
from components.errors import UserError
from components.images import to_float
from components.progress import track
from components.tasks import complete, inpaint_inputs, superres_inputs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Sampled:
    name: str  # the output's file stem: a number, or the input's own stem
    image: torch.Tensor  # uint8 [3, H, W]


def read_images(folder: Path, mode: str = "RGB") -> dict[str, torch.Tensor]:
    """Every image in ``folder`` by file stem, uint8 [C, H, W] (PIL decodes them: nothing is unpickled)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of images: pass a folder holding PNG or JPEG files.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}): pass a folder that does.")
    images = {}
    for path in files:
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert(mode))
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"{path} is not a readable image ({exc}): remove it or replace it.") from None
        images[path.stem] = torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1).contiguous()
    return images


def _fits(model: TrainedLDM, height: int, width: int, what: str) -> None:
    """A latent the denoiser takes: a whole number of latent cells, halved by each UNet level."""
    f = model.stage.factor
    step = f * 2 ** (len(model.module.unet.config.block_out_channels) - 1)
    if height % step or width % step:
        raise UserError(
            f"{what} is {width}x{height} px: this model (f={f}, {len(model.module.unet.config.block_out_channels)} "
            f"UNet levels) needs sides that are multiples of {step} px. Crop or pad the image to such a size."
        )


def generate(model: TrainedLDM, count: int, size: int, steps: int, seed: int, batch_size: int = 16) -> list[Sampled]:
    """``count`` new images at ``size`` times the training size on each side; conditioned models
    cycle through the rows their sample grid shows (each class, or some captions)."""
    rows = [index for _, index in model.conditioning.grid_rows] or [0]
    cond = torch.tensor([rows[i % len(rows)] for i in range(count)])
    latent_side = model.module.unet.config.sample_size * size
    _fits(model, latent_side * model.stage.factor, latent_side * model.stage.factor, f"--size {size}")
    generator = torch.Generator().manual_seed(seed)
    out = []
    for batch in track(cond.split(batch_size), f"Sampling at {size}x the training size ({steps} steps)"):
        latents = model.module.sample(batch, size=latent_side, steps=steps, generator=generator)
        out += list(model.stage.decode_latents(latents.cpu()))
    return [Sampled(f"{i:04d}", image) for i, image in enumerate(out)]


def upscale(model: TrainedLDM, images: dict[str, torch.Tensor], steps: int, seed: int) -> list[Sampled]:
    """Each image ``ldm.superres_scale`` times larger on each side, one at a time (any sizes)."""
    scale = model.module.params_.superres_scale
    out = []
    for name, image in track(list(images.items()), f"Upscaling x{scale} ({steps} steps)"):
        size = (image.shape[-2] * scale, image.shape[-1] * scale)
        _fits(model, *size, f"{name} upscaled x{scale}")
        inputs = superres_inputs(to_float(image[None]), size, model.stage)
        out.append(Sampled(name, _sample(model, inputs.concat, steps, seed)[0]))
    return out


def fill(
    model: TrainedLDM, images: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], steps: int, seed: int
) -> list[Sampled]:
    """Each image with the white (> 50 % grey) pixels of its mask (same file stem) filled in."""
    missing = sorted(set(images) - set(masks))
    if missing:
        raise UserError(f"No mask for {', '.join(missing[:5])}: give each image a mask of the same file name.")
    out = []
    for name, image in track(list(images.items()), f"Inpainting ({steps} steps)"):
        mask = (masks[name][:1] > 127).float()[None]
        if mask.shape[-2:] != image.shape[-2:]:
            raise UserError(
                f"The mask of {name} is {mask.shape[-1]}x{mask.shape[-2]} px, its image "
                f"{image.shape[-1]}x{image.shape[-2]}: give masks the size of their images."
            )
        _fits(model, *image.shape[-2:], name)
        inputs = inpaint_inputs(image[None], mask, model.stage)
        out.append(Sampled(name, complete(_sample(model, inputs.concat, steps, seed), image[None], inputs)[0]))
    return out


def _sample(model: TrainedLDM, concat: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    """From the given image alone: a hybrid model's cross-attention gets its null context."""
    cond = torch.full((len(concat),), model.module.conditioner.null)
    generator = torch.Generator().manual_seed(seed)
    latents = model.module.sample(cond, concat=concat, steps=steps, guidance_scale=1.0, generator=generator)
    return model.stage.decode_latents(latents.cpu())
