"""The first stage's loss (Esser et al.'s VQGAN loss, as the LDM paper uses it).

L1 (or L2: ``ae.pixel_loss``) + perceptual term + KL or codebook term + a patch
discriminator's hinge loss whose weight adapts to the ratio of gradient norms at the decoder's
last layer and starts at ``disc_start``.
The perceptual term is LPIPS when VGG weights are on disk, else 1 - SSIM, which needs no
weights; ``perceptual_name`` says which one a run used.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure

from components.errors import UserError
from components.workspace import write_atomically

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16, as LPIPS uses


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming-transformers): one real/fake logit per image patch."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [
                nn.Conv2d(width, out, 4, stride, 1, bias=False),
                nn.BatchNorm2d(out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def vgg_weights_available(path: str | None) -> Path | None:
    """A local VGG16 file for LPIPS: the configured path, else torch's hub cache."""
    candidates = [Path(path)] if path else []
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE)
    return next((c for c in candidates if c.is_file()), None)


def _install_in_hub_cache(weights: Path | None) -> None:
    """torchvision loads VGG16 only from torch's hub cache, and unpickles it in full. So a file the
    user names is never linked there: its bytes are copied there only after they loaded with
    ``weights_only=True`` (tensors and plain containers, nothing that runs code); a file found
    there already is checked the same way before torchvision reads it."""
    if weights is None:
        return
    cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    content = weights.read_bytes()
    try:
        torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever it is, it is not a plain state dict
        raise UserError(
            f"{weights} is not a plain weights file ({type(exc).__name__}), so it was not loaded: "
            f"replace it with torchvision's {VGG16_FILE} (ae.lpips_vgg_weights names it; else torch's hub cache)."
        ) from None
    if weights.resolve() == cached.resolve():
        return
    cached.unlink(missing_ok=True)  # (older versions linked the named file here)
    write_atomically(cached, lambda partial: partial.write_bytes(content))


class PerceptualLoss(nn.Module):
    """LPIPS (torchmetrics, VGG) when weights exist locally; otherwise 1 - SSIM."""

    def __init__(self, mode: str = "auto", vgg_path: str | None = None):
        super().__init__()
        weights = vgg_weights_available(vgg_path)
        if mode == "lpips" and weights is None and vgg_path:
            raise FileNotFoundError(f"ae.lpips_vgg_weights={vgg_path} does not exist")
        self.name = "lpips" if mode == "lpips" or (mode == "auto" and weights) else "ssim"
        self.lpips = None
        if self.name == "lpips":
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            _install_in_hub_cache(weights)
            self.lpips = LearnedPerceptualImagePatchSimilarity("vgg", reduction="mean", normalize=False)
            self.lpips.requires_grad_(False)

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.lpips is not None:
            return self.lpips(reconstruction.clamp(-1, 1), target)
        ssim = structural_similarity_index_measure((reconstruction + 1) / 2, (target + 1) / 2, data_range=1.0)
        return 1 - ssim


class AutoencoderLoss(nn.Module):
    def __init__(
        self,
        *,
        regularization_weight: float,
        perceptual: PerceptualLoss,
        perceptual_weight: float = 1.0,
        pixel_loss: str = "l1",
        disc_start: int = 0,
        disc_weight: float = 0.5,
        disc_layers: int = 3,
    ):
        super().__init__()
        self.regularization_weight = regularization_weight
        self.perceptual, self.perceptual_weight = perceptual, perceptual_weight
        self.pixel_loss = pixel_loss
        self.disc_start, self.disc_weight = disc_start, disc_weight
        self.discriminator = PatchDiscriminator(layers=disc_layers)

    def generator_loss(
        self,
        x: torch.Tensor,
        recon: torch.Tensor,
        regularization: torch.Tensor,
        step: int,
        last_layer: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        error = recon - x
        pixel = error.abs().mean() if self.pixel_loss == "l1" else error.square().mean()
        perceptual = self.perceptual(recon, x)
        nll = pixel + self.perceptual_weight * perceptual
        loss = nll + self.regularization_weight * regularization
        logs = {self.pixel_loss: pixel.detach(), "perceptual": perceptual.detach(), "reg": regularization.detach()}
        if step >= self.disc_start and self.disc_weight > 0:
            g_loss = -self.discriminator(recon).mean()
            weight = self._adaptive_weight(nll, g_loss, last_layer)
            loss = loss + weight * g_loss
            logs |= {"g_loss": g_loss.detach(), "d_weight": weight.detach()}
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Hinge loss on real vs reconstructed patches."""
        real, fake = self.discriminator(x.detach()), self.discriminator(recon.detach())
        return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())

    def _adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
        return weight.clamp(0, 1e4).detach() * self.disc_weight
