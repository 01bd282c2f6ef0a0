"""The first stage: the paper's perceptual compression, and everything that follows from f.

``FirstStage`` is pixel space (f = 1): images are their own latents. ``Autoencoder`` is a
trained diffusers ``AutoencoderKL`` or ``VQModel`` with m = log2 f downsampling levels (m + 1
resolution blocks). Both give the diffusion model one interface: ``latent_shape``,
``encode_images`` to scaled latents and ``decode_latents`` back to uint8 images. The latent
scale (the paper's ``scale_by_std``: 1 / std of the first batch's latents, so the denoiser sees
roughly unit variance whatever f) is fitted once after training and saved in the diffusers
config as ``scaling_factor``, so a saved first stage is complete on its own.

``pixel_space`` is the one place where f = 1 means "no network"; ``FirstStageRef`` is how runs
name a first stage (an autoencoder run, or the pixels of a data version), in one encoding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, VQModel
from torch import nn

from components.images import to_float, to_uint8
from components.params import AEParams, downsampling_levels
from components.progress import track

# Latent channels by f, from the reference configs (Table 8): more channels as f grows, and
# more for KL than for VQ at f >= 16 (KL f16: 16, f32: 64; VQ f16: 8, f32: 16).
DEFAULT_LATENT_CHANNELS = {
    "kl": {2: 3, 4: 3, 8: 4, 16: 16, 32: 64},
    "vq": {2: 3, 4: 3, 8: 4, 16: 8, 32: 16},
}
SCALE_BATCH = 64  # latents of the first batch set the scale, as in the reference code
NETWORKS = {"kl": AutoencoderKL, "vq": VQModel}


@dataclass
class Reconstruction:
    image: torch.Tensor  # in [-1, 1]
    regularization: torch.Tensor  # KL divergence, or codebook + commitment loss
    codes: torch.Tensor | None = None  # VQ codebook indices, for usage statistics


PIXEL_SPACE = "pixels"  # the kind of a first stage that is the identity


def pixel_space(factor: int) -> bool:
    """f = 1: diffusion on the pixels themselves, no first stage to train (the paper's LDM-1)."""
    return factor == 1


@dataclass(frozen=True)
class FirstStageRef:
    """An LDM's first stage as runs record it: ``id`` names it in run keys, latent caches and the
    ``latentlab.first_stage`` tag: an autoencoder's run id, or ``pixels-<data version>-<px>``.
    ``precision``: what it trained in, so its latents are encoded in the same precision on any
    machine (pixel space: 32-true)."""

    id: str
    factor: int
    precision: str = "32-true"
    reused: bool = True

    @classmethod
    def pixels(cls, data_version: str, resolution: int) -> FirstStageRef:
        return cls(f"{PIXEL_SPACE}-{data_version}-{resolution}", 1)

    @property
    def autoencoder_run(self) -> str | None:
        """The autoencoder run that trained it; None in pixel space."""
        return None if self.id.startswith(f"{PIXEL_SPACE}-") else self.id


class FirstStage(nn.Module):
    """Pixel space (f = 1): the identity, with nothing to train. The base of every first stage."""

    factor = 1
    regularizer = "none"
    trainable = False

    def __init__(self, latent_channels: int = 3, scale: float = 1.0):
        super().__init__()
        self.latent_channels, self.scale = latent_channels, scale

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(channels, height, width) of the latent of a ``resolution``-pixel image."""
        side = resolution // self.factor
        return self.latent_channels, side, side

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> unscaled latents."""
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> [-1, 1] images."""
        return z

    def reconstruct(self, x: torch.Tensor) -> Reconstruction:
        return Reconstruction(x, x.new_zeros(()))

    @torch.no_grad()
    def encode_images(
        self, images: torch.Tensor, batch_size: int = SCALE_BATCH, progress: bool = False
    ) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> scaled latents [N, c, H/f, W/f] (KL: mode; VQ: before quantisation)."""
        self.eval()
        chunks = images.split(batch_size)
        if progress:
            chunks = track(chunks, "Encoding latents")
        return torch.cat([self.encode(to_float(c.to(self.device))).cpu() for c in chunks]) * self.scale

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, batch_size: int = SCALE_BATCH) -> torch.Tensor:
        """Scaled latents -> uint8 images."""
        self.eval()
        return torch.cat(
            [to_uint8(self.decode(z.to(self.device) / self.scale)).cpu() for z in latents.split(batch_size)]
        )

    def fit_scale(self, images: torch.Tensor) -> float:
        """Set the latent scale from the first batch of ``images`` (uint8); pixel space keeps 1."""
        return self.scale

    @property
    def device(self) -> torch.device:
        return next((p.device for p in self.parameters()), torch.device("cpu"))


class Autoencoder(FirstStage):
    """A trained (or trainable) diffusers autoencoder with ``factor`` = 2 ** levels."""

    trainable = True

    def __init__(self, regularizer: str, net: AutoencoderKL | VQModel):
        super().__init__(net.config.latent_channels, float(net.config.scaling_factor))
        self.regularizer, self.net = regularizer, net
        self.factor = 2 ** (len(net.config.block_out_channels) - 1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output weights, for the adaptive GAN weight."""
        return self.net.decoder.conv_out.weight

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.regularizer == "kl":
            return self.net.encode(x).latent_dist.mode()
        return self.net.encode(x).latents

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.net.decode(z).sample

    def reconstruct(self, x: torch.Tensor) -> Reconstruction:
        if self.regularizer == "kl":
            posterior = self.net.encode(x).latent_dist
            image = self.net.decode(posterior.sample()).sample
            # KL summed over latent elements, per image pixel value: CompVis sums both the
            # reconstruction loss and the KL, so dividing by pixels keeps kl_weight in its units.
            return Reconstruction(image, posterior.kl().sum() / x.numel())
        h = self.net.encode(x).latents
        quantized, loss, (_, _, codes) = self.net.quantize(h)
        image = self.net.decode(quantized, force_not_quantize=True).sample
        return Reconstruction(image, loss.mean(), codes.flatten())

    def fit_scale(self, images: torch.Tensor) -> float:
        self.scale = 1.0
        latents = self.encode_images(images[:SCALE_BATCH])
        self.scale = float(1.0 / latents.flatten().std())
        self.net.register_to_config(scaling_factor=self.scale)
        return self.scale

    def save_pretrained(self, directory: Path) -> None:
        """diffusers' directory: config.json (with the latent scale) + safetensors weights."""
        self.net.save_pretrained(directory, safe_serialization=True)


def norm_groups(width: int, channels_per_group: int) -> int:
    """GroupNorm groups for the narrowest width: as many as fit ``channels_per_group`` channels
    each (at most 32, as CompVis), dividing the width. One channel a group would be an instance
    norm, which discards each channel's absolute level (an emoji's colour)."""
    return max(g for g in range(1, 33) if width % g == 0 and width // g >= min(channels_per_group, width))


def build_first_stage(ae: AEParams, resolution: int) -> FirstStage:
    """A fresh first stage for ``ae.factor``; f = 1 is pixel space, nothing to train."""
    if pixel_space(ae.factor):
        return FirstStage()
    channels = ae.latent_channels or DEFAULT_LATENT_CHANNELS[ae.regularizer][ae.factor]
    widths = tuple(ae.base_channels * m for m in ae.channel_mult[: downsampling_levels(ae.factor) + 1])
    common = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=widths,
        layers_per_block=ae.layers_per_block,
        latent_channels=channels,
        norm_num_groups=norm_groups(ae.base_channels, ae.channels_per_group),
        sample_size=resolution,
        mid_block_add_attention=ae.attention,
        scaling_factor=1.0,  # until fit_scale
    )
    if ae.regularizer == "kl":
        return Autoencoder("kl", AutoencoderKL(**common))
    return Autoencoder("vq", VQModel(**common, num_vq_embeddings=ae.codebook_size, vq_embed_dim=channels))


def load_first_stage(directory: Path) -> Autoencoder:
    """A saved autoencoder (``save_pretrained``): factor, regularizer and scale from its config."""
    name = json.loads((Path(directory) / "config.json").read_text())["_class_name"]
    regularizer = next(r for r, cls in NETWORKS.items() if cls.__name__ == name)
    return Autoencoder(regularizer, NETWORKS[regularizer].from_pretrained(directory, use_safetensors=True))
