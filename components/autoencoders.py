"""First-stage models: the paper's perceptual compression, for every factor f = 2^m.

``FirstStage`` gives KL, VQ and pixel-space (f = 1) models one interface: ``encode`` to the
latent the diffusion model sees, ``decode`` back to pixels, ``reconstruct`` for training. The
networks are diffusers' ``AutoencoderKL`` and ``VQModel``; m downsampling levels mean m + 1
resolution blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, VQModel
from torch import nn

# Paper (Table 8 and its reference configs): more latent channels as f grows.
DEFAULT_LATENT_CHANNELS = {1: 3, 2: 3, 4: 3, 8: 4, 16: 8, 32: 16}


@dataclass
class Reconstruction:
    image: torch.Tensor  # in [-1, 1]
    regularization: torch.Tensor  # KL divergence, or codebook + commitment loss
    codes: torch.Tensor | None = None  # VQ codebook indices, for usage statistics


class FirstStage(nn.Module):
    """Common interface over a diffusers autoencoder (or none, for f = 1)."""

    def __init__(self, factor: int, regularizer: str, net: nn.Module | None, latent_channels: int):
        super().__init__()
        self.factor, self.regularizer, self.latent_channels = factor, regularizer, latent_channels
        self.net = net

    @property
    def trainable(self) -> bool:
        return self.net is not None

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output weights, for the adaptive GAN weight."""
        return self.net.decoder.conv_out.weight

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The latent a diffusion model works on (KL: posterior mode; VQ: before quantisation)."""
        if self.net is None:
            return x
        if self.regularizer == "kl":
            return self.net.encode(x).latent_dist.mode()
        return self.net.encode(x).latents

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.net is None:
            return z
        return self.net.decode(z).sample

    def reconstruct(self, x: torch.Tensor) -> Reconstruction:
        if self.net is None:
            return Reconstruction(x, x.new_zeros(()))
        if self.regularizer == "kl":
            posterior = self.net.encode(x).latent_dist
            image = self.net.decode(posterior.sample()).sample
            return Reconstruction(image, posterior.kl().sum() / x.shape[0])
        h = self.net.encode(x).latents
        quantized, loss, (_, _, codes) = self.net.quantize(h)
        image = self.net.decode(quantized, force_not_quantize=True).sample
        return Reconstruction(image, loss.mean(), codes.flatten())

    def save_pretrained(self, directory: Path) -> None:
        if self.net is not None:
            self.net.save_pretrained(directory, safe_serialization=True)


def build_first_stage(
    factor: int,
    regularizer: str = "kl",
    *,
    latent_channels: int | None = None,
    base_channels: int = 32,
    channel_mult: tuple[int, ...] = (1, 2, 2, 4, 4, 4),
    layers_per_block: int = 1,
    attention: bool = True,
    codebook_size: int = 256,
    resolution: int = 64,
) -> FirstStage:
    """A fresh first stage with f = ``factor`` (``factor`` = 1: pixel space, nothing to train)."""
    levels = factor.bit_length() - 1
    channels = latent_channels or DEFAULT_LATENT_CHANNELS[factor]
    if factor == 1:
        return FirstStage(1, regularizer, None, 3)
    if len(channel_mult) < levels + 1:
        raise ValueError(f"ae.channel_mult needs {levels + 1} entries for f={factor}")
    widths = tuple(base_channels * m for m in channel_mult[: levels + 1])
    common = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=widths,
        layers_per_block=layers_per_block,
        latent_channels=channels,
        norm_num_groups=min(32, base_channels),
        sample_size=resolution,
        mid_block_add_attention=attention,
    )
    if regularizer == "kl":
        net = AutoencoderKL(**common)
    else:
        net = VQModel(**common, num_vq_embeddings=codebook_size, vq_embed_dim=channels)
    return FirstStage(factor, regularizer, net, channels)


def load_first_stage(directory: Path, factor: int, regularizer: str) -> FirstStage:
    """A trained first stage from its diffusers directory (safetensors)."""
    if factor == 1:
        return FirstStage(1, regularizer, None, 3)
    cls = AutoencoderKL if regularizer == "kl" else VQModel
    net = cls.from_pretrained(directory, use_safetensors=True)
    return FirstStage(factor, regularizer, net, net.config.latent_channels)
