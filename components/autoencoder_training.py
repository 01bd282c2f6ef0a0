"""The first stage's Lightning module: reconstruct, regularise, and fool a patch discriminator."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from components import distributed
from components.first_stage import build_first_stage
from components.grids import labeled_grid
from components.images import to_float, to_pil, to_uint8
from components.losses import AutoencoderLoss, PerceptualLoss
from components.metrics import Reference, codebook_usage, psnr_ssim
from components.params import AEParams
from components.precision import decide
from components.training import add_budget_buffers, fit, make_trainer


class AutoencoderModule(L.LightningModule):
    """Two optimisers, stepped by hand: the autoencoder, then (after ``disc_start``) the critic."""

    def __init__(self, ae: dict[str, Any], resolution: int):
        super().__init__()
        self.save_hyperparameters()  # plain values only: checkpoints load with weights_only
        self.params_ = AEParams.model_validate(ae)
        self.automatic_optimization = False
        self.stage = build_first_stage(self.params_, resolution)
        self.perceptual = PerceptualLoss(self.params_.perceptual, self.params_.lpips_vgg_weights)
        weight = self.params_.kl_weight if self.params_.regularizer == "kl" else self.params_.codebook_weight
        self.loss = AutoencoderLoss(
            regularization_weight=weight,
            perceptual=self.perceptual,
            perceptual_weight=self.params_.perceptual_weight,
            pixel_loss=self.params_.pixel_loss,
            disc_start=self.params_.disc_start,
            disc_weight=self.params_.disc_weight,
            disc_layers=2 if resolution <= 32 else 3,
        )
        if self.params_.channels_last:
            self.to(memory_format=torch.channels_last)
        add_budget_buffers(self)
        self.logged: dict[str, torch.Tensor] = {}

    def configure_optimizers(self):
        betas = tuple(self.params_.adam_betas)
        return (
            torch.optim.Adam(self.stage.parameters(), lr=self.params_.lr, betas=betas),
            torch.optim.Adam(self.loss.discriminator.parameters(), lr=self.params_.lr, betas=(0.5, 0.9)),
        )

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        x = to_float(batch[0])
        if self.params_.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        opt_ae, opt_disc = self.optimizers()
        step = int(self.steps)
        out = self.stage.reconstruct(x)
        loss, logs = self.loss.generator_loss(x, out.image, out.regularization, step, self.stage.last_layer)
        opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt_ae.step()
        if step >= self.params_.disc_start and self.params_.disc_weight > 0:
            d_loss = self.loss.discriminator_loss(x, out.image)
            opt_disc.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_disc.step()
            logs["d_loss"] = d_loss.detach()
        self.logged = {"train_loss": loss.detach(), **logs}

    @torch.no_grad()
    def reconstruct_uint8(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Deterministic reconstructions (posterior mode / nearest codes) of uint8 images."""
        was_training = self.training
        self.eval()
        parts = []
        for chunk in images.split(batch_size):
            x = to_float(chunk.to(self.device))
            parts.append(to_uint8(self.stage.decode(self.stage.encode(x))).cpu())
        self.train(was_training)
        return torch.cat(parts)


def reconstruction_grid(module: AutoencoderModule, images: torch.Tensor) -> Image.Image:
    """Originals over their reconstructions."""
    recon = module.reconstruct_uint8(images)
    return labeled_grid([("original", to_pil(images)), ("reconstruction", to_pil(recon))])


def train_autoencoder(
    ae: AEParams,
    train_images: torch.Tensor,
    *,
    resolution: int,
    checkpoint_dir: Path,
    seed: int,
    precision: str | None = None,
    callbacks: Sequence[L.Callback] = (),
) -> AutoencoderModule:
    """Train (or resume) a first stage on uint8 images; ``callbacks`` report (``components.mlflow_callbacks``).
    ``precision``: as the run decided it (``components.precision``); None decides here."""
    precision = precision or decide(ae.precision, "autoencoder").value
    L.seed_everything(seed, verbose=False)
    module = AutoencoderModule(ae.model_dump(mode="json"), resolution)
    loader = DataLoader(TensorDataset(train_images), batch_size=ae.batch_size, shuffle=True, drop_last=True)
    rank_args = {"ae": ae.model_dump(mode="json"), "resolution": resolution, "checkpoint_dir": str(checkpoint_dir)}
    with distributed.ranks(
        ae.devices,
        Path(checkpoint_dir) / "ranks",
        f"{__name__}:train_rank",
        {**rank_args, "seed": seed, "precision": precision},
        {"train_images": train_images},
    ):
        trainer = make_trainer(ae, checkpoint_dir, list(callbacks), precision, manual_optimization=True)
        fit(trainer, module, loader, checkpoint_dir)
    return module.to(memory_format=torch.contiguous_format)  # NHWC is a training layout; files want NCHW


def train_rank(args: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """What ``distributed.ranks`` runs in each other training process: the same training, unreported."""
    ae = AEParams.model_validate(args["ae"])
    train_autoencoder(
        ae,
        tensors["train_images"],
        resolution=args["resolution"],
        checkpoint_dir=Path(args["checkpoint_dir"]),
        seed=args["seed"],
        precision=args["precision"],
    )


def evaluate_autoencoder(module: AutoencoderModule, reference: Reference) -> dict[str, float]:
    """PSNR, SSIM, rFID/rKID (reconstructions of the reference images against them), LPIPS and
    codebook use when they apply."""
    val_images = reference.images
    recon = module.reconstruct_uint8(val_images)
    metrics = psnr_ssim(val_images, recon)
    fidelity = reference.score(recon, full=False)
    metrics |= {"rfid": fidelity["fid"], "rkid_mean": fidelity["kid_mean"]}
    if module.perceptual.lpips is not None:
        with torch.no_grad():
            x, y = (to_float(t.to(module.device)) for t in (recon, val_images))
            metrics["lpips"] = float(module.perceptual.lpips(x, y))
    if module.stage.regularizer == "vq":
        with torch.no_grad():
            codes = torch.cat(
                [module.stage.reconstruct(to_float(c.to(module.device))).codes for c in val_images.split(64)]
            )
        metrics |= codebook_usage(codes.cpu(), module.params_.codebook_size)
    return metrics
