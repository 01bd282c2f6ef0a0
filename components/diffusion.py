"""The latent diffusion model: a cross-attention UNet (diffusers) trained to predict noise.

Paper settings: 1000 steps, the "linear" schedule linspace(sqrt(0.0015), sqrt(0.0195))^2 (which
diffusers calls ``scaled_linear``), epsilon prediction, L2 loss, EMA weights, AdamW. Sampling
uses diffusers' DDPM or DDIM schedulers, with classifier-free guidance for conditional models.
A trained model is saved diffusers-style (``save_pretrained``): its config (LDM parameters,
latent shape, conditioning) beside the EMA weights, so it loads from that directory alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pytorch_lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel, compute_snr
from safetensors.torch import load_file, save_file

from components.conditioning import Conditioner
from components.params import LDMParams
from components.progress import track

CONFIG = "ldm.json"
WEIGHTS = "ldm_ema.safetensors"
SAVED = ("unet", "conditioner")  # what the sampled model is made of


def build_unet(
    ldm: LDMParams, channels: int, size: int, context_dim: int, condition_channels: int = 0
) -> UNet2DConditionModel:
    """A UNet over ``size``-pixel latents: as many levels as ``ldm.widths`` and the size allow,
    cross-attention only where the feature map is at most ``attention_max_size``.
    ``condition_channels``: stacked on the noisy latent (``components.tasks``); it predicts the
    latent's ``channels`` only."""
    levels = max(1, min(len(ldm.widths), size.bit_length()))  # each level but the last halves
    widths = tuple(ldm.widths[:levels])
    sizes = [max(size >> i, 1) for i in range(levels)]
    down = tuple("CrossAttnDownBlock2D" if s <= ldm.attention_max_size else "DownBlock2D" for s in sizes)
    up = tuple("CrossAttnUpBlock2D" if s <= ldm.attention_max_size else "UpBlock2D" for s in reversed(sizes))
    return UNet2DConditionModel(
        sample_size=size,
        in_channels=channels + condition_channels,
        out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=widths,
        layers_per_block=ldm.layers_per_block,
        cross_attention_dim=context_dim,
        attention_head_dim=8,
        norm_num_groups=min(32, widths[0]),
    )


def noise_scheduler(ldm: LDMParams) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=ldm.timesteps,
        beta_start=ldm.beta_start,
        beta_end=ldm.beta_end,
        beta_schedule="scaled_linear",
        prediction_type=ldm.prediction,
        clip_sample=False,
    )


class LatentDiffusionModule(L.LightningModule):
    def __init__(
        self,
        ldm: dict[str, Any],
        channels: int,
        size: int,
        num_classes: int,
        conditioner: Conditioner,
        condition_channels: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["conditioner"])
        self.params_ = LDMParams.model_validate(ldm)
        self.conditioner = conditioner
        self.unet = build_unet(self.params_, channels, size, conditioner.dim, condition_channels)
        self.scheduler = noise_scheduler(self.params_)
        self.ema = EMAModel(self.unet.parameters(), decay=self.params_.ema_decay, use_ema_warmup=True)
        self.logged: dict[str, torch.Tensor] = {}

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self.params_.lr, weight_decay=self.params_.weight_decay)

    def loss(self, latents: torch.Tensor, cond: torch.Tensor, concat: torch.Tensor | None = None) -> torch.Tensor:
        """L2 loss on the noise (``ldm.prediction`` epsilon, the paper's) or the velocity, at
        uniformly drawn timesteps, optionally Min-SNR-gamma weighted (``ldm.snr_gamma``, as
        diffusers' training examples); conditions dropped at ``uncond_prob`` so the same network
        also learns the unconditional score. ``concat``: the task's image condition, stacked on
        the noisy latent (never dropped: the task is what it is given)."""
        p = self.params_
        noise = torch.randn_like(latents)
        t = torch.randint(0, p.timesteps, (len(latents),), device=latents.device)
        drop = torch.rand(len(cond), device=cond.device) < p.uncond_prob
        cond = torch.where(drop, torch.full_like(cond, self.conditioner.null), cond)
        noisy = self.scheduler.add_noise(latents, noise, t)
        model_in = noisy if concat is None else torch.cat([noisy, concat], dim=1)
        prediction = self.unet(model_in, t, encoder_hidden_states=self.conditioner(cond)).sample
        target = noise if p.prediction == "epsilon" else self.scheduler.get_velocity(latents, noise, t)
        if p.snr_gamma is None:
            return F.mse_loss(prediction, target)
        snr = compute_snr(self.scheduler, t)
        weight = torch.clamp(snr, max=p.snr_gamma) / (snr if p.prediction == "epsilon" else snr + 1)
        per_sample = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * weight).mean()

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        loss = self.loss(*batch)
        self.logged = {"train_loss": loss.detach()}
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        """The update, then the EMA's: inside the batch, so the training time (budget, images/s)
        counts the EMA too (6-11 ms a step here, up to 8 % of a small-latent step)."""
        super().optimizer_step(*args, **kwargs)
        self.ema.step(self.unet.parameters())

    def on_fit_start(self) -> None:
        self.ema.to(self.device)  # the averaged weights live where the model trains (CUDA), not on the CPU
        if torch.distributed.is_initialized():
            # Each training process began its average from its own initial weights; DDP has
            # since given every process rank 0's weights, so the average follows.
            for average in self.ema.shadow_params:
                torch.distributed.broadcast(average.data, src=0)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.ema.load_state_dict(checkpoint["ema"])

    def sampling_scheduler(self, sampler: str) -> DDIMScheduler | DDPMScheduler:
        """A fresh sampler on the training schedule (the reference code's DDIM settings:
        timesteps offset by one, no forced final alpha of one)."""
        if sampler == "ddim":
            return DDIMScheduler.from_config(self.scheduler.config, steps_offset=1, set_alpha_to_one=False)
        return DDPMScheduler.from_config(self.scheduler.config)

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """The UNet holds its EMA weights inside the block, its training weights again after."""
        self.ema.store(self.unet.parameters())
        self.ema.copy_to(self.unet.parameters())
        try:
            yield
        finally:
            self.ema.restore(self.unet.parameters())

    def save_pretrained(self, directory: Path, **extra: Any) -> Path:
        """``directory``/ldm.json (what builds this model, plus ``extra`` facts) and the model as
        sampled: EMA UNet and conditioning table (``unet.*``, ``conditioner.*``, safetensors)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        h = self.hparams
        config = {name: h[name] for name in ("ldm", "channels", "size", "num_classes", "condition_channels")}
        (directory / CONFIG).write_text(
            json.dumps({**config, "conditioning": self.conditioner.mode, **extra}, indent=2)
        )
        with self.ema_weights():
            state = {k: v.contiguous() for k, v in self.state_dict().items() if k.split(".")[0] in SAVED}
            save_file(state, directory / WEIGHTS)
        return directory

    @classmethod
    def from_pretrained(cls, directory: Path, conditioner: Conditioner) -> LatentDiffusionModule:
        """Inverse of ``save_pretrained``, in eval mode (safetensors: no code runs on load).
        ``conditioner``: built for the same data (``conditioning_for``); its table is replaced by the
        saved one where the model learned it."""
        directory = Path(directory)
        config = read_config(directory)
        module = cls(
            config["ldm"],
            config["channels"],
            config["size"],
            config["num_classes"],
            conditioner,
            config.get("condition_channels", 0),  # (models saved before tasks stacked nothing)
        )
        result = module.load_state_dict(load_file(directory / WEIGHTS), strict=False)
        missing = [k for k in result.missing_keys if k.split(".")[0] in SAVED]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{directory} does not match this model: missing {missing}, unexpected {result.unexpected_keys}"
            )
        # The loaded weights are the EMA weights: restart the average from them.
        module.ema = EMAModel(module.unet.parameters(), decay=module.params_.ema_decay)
        return module.eval()

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        *,
        concat: torch.Tensor | None = None,
        size: int | None = None,
        steps: int | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
        progress: bool = False,
    ) -> torch.Tensor:
        """Latents for the condition indices ``cond`` (scaled like the training latents).
        ``concat``: the task's image condition per sample; its size is the latents' size. Else
        ``size``: the latent's side (default: the training size; the denoiser is convolutional,
        so a larger latent gives a larger image, the paper's Section 4.3.2)."""
        p = self.params_
        steps, eta = steps or p.sample_steps, p.eta if eta is None else eta
        guidance = p.guidance_scale if guidance_scale is None else guidance_scale
        guided = guidance > 1 and self.conditioner.mode != "none"
        scheduler = self.sampling_scheduler(sampler or p.sampler)
        scheduler.set_timesteps(steps)
        was_training = self.training
        self.eval()
        try:
            with self.ema_weights() if use_ema else nullcontext():
                context = self.conditioner(cond.to(self.device))
                if guided:
                    null = self.conditioner(torch.full_like(cond, self.conditioner.null).to(self.device))
                    context = torch.cat([null, context])
                unet = self.unet
                height, width = (size or unet.config.sample_size,) * 2 if concat is None else concat.shape[-2:]
                x = torch.randn((len(cond), unet.config.out_channels, height, width), generator=generator)
                x = x.to(self.device)
                if concat is not None:
                    concat = concat.to(self.device)
                    concat = torch.cat([concat, concat]) if guided else concat
                kwargs = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
                for t in track(scheduler.timesteps, "Sampling") if progress else scheduler.timesteps:
                    model_in = torch.cat([x, x]) if guided else x
                    if concat is not None:
                        model_in = torch.cat([model_in, concat], dim=1)
                    eps = unet(model_in, t, encoder_hidden_states=context).sample
                    if guided:
                        eps_uncond, eps_cond = eps.chunk(2)
                        eps = eps_uncond + guidance * (eps_cond - eps_uncond)
                    x = scheduler.step(eps, t, x, generator=generator, **kwargs).prev_sample
            return x
        finally:
            self.train(was_training)


def read_config(directory: Path) -> dict[str, Any]:
    """The config a saved model was built from (``save_pretrained``'s ldm.json)."""
    return json.loads((Path(directory) / CONFIG).read_text())
