"""Training, sampling and export around ``LatentDiffusionModule``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as L
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from components.autoencoders import FirstStage
from components.diffusion import LatentDiffusionModule
from components.grids import labeled_grid
from components.metrics import to_uint8
from components.params import LDMParams
from components.training import MLflowReporter, PeriodicEvaluation, fit, make_trainer


@torch.no_grad()
def decode(stage: FirstStage, latents: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled latents -> uint8 images."""
    stage.eval()
    return to_uint8(torch.cat([stage.decode(z / scale) for z in latents.split(64)]))


def sample_grid(
    module: LatentDiffusionModule,
    stage: FirstStage,
    scale: float,
    rows: list[tuple[str, int]],
    per_row: int,
    seed: int = 0,
) -> Image.Image:
    """One row per (label, condition index): ``per_row`` samples each, decoded to pixels."""
    cond = torch.tensor([index for _, index in rows for _ in range(per_row)])
    latents = module.sample(cond, generator=torch.Generator().manual_seed(seed))
    images = decode(stage, latents.cpu(), scale)
    pil = [Image.fromarray(i.permute(1, 2, 0).numpy()) for i in images]
    return labeled_grid([(label, pil[r * per_row : (r + 1) * per_row]) for r, (label, _) in enumerate(rows)])


def flops_per_step(module: LatentDiffusionModule, latents: torch.Tensor, cond: torch.Tensor) -> int:
    """Forward + backward FLOPs of one training step (torch.utils.flop_counter)."""
    counter = FlopCounterMode(display=False)
    with counter:
        module.loss(latents, cond).backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def train_ldm(
    module: LatentDiffusionModule,
    ldm: LDMParams,
    latents: torch.Tensor,
    cond: torch.Tensor,
    *,
    run_id: str,
    checkpoint_dir: Path,
    seed: int,
    grid: Callable[[], Image.Image],
    evaluate: Callable[[], dict[str, float]] | None = None,
) -> LatentDiffusionModule:
    """Train (or resume) on cached latents; ``evaluate`` (FID) every ``ldm.fid_every`` steps."""
    L.seed_everything(seed, verbose=False)
    loader = DataLoader(TensorDataset(latents, cond), batch_size=ldm.batch_size, shuffle=True, drop_last=True)
    callbacks: list[L.Callback] = [MLflowReporter(run_id, ldm, grid, "samples")]
    if evaluate is not None:
        callbacks.append(PeriodicEvaluation(run_id, ldm.fid_every, evaluate))
    trainer = make_trainer(ldm, checkpoint_dir, callbacks)
    fit(trainer, module, loader, checkpoint_dir)
    return module


def save_ema_weights(module: LatentDiffusionModule, path: Path) -> None:
    """The model as sampled: EMA UNet and the conditioning table (``unet.*``, ``conditioner.*``)."""
    module.ema.store(module.unet.parameters())
    module.ema.copy_to(module.unet.parameters())
    try:
        state = {
            k: v.contiguous() for k, v in module.state_dict().items() if k.split(".")[0] in ("unet", "conditioner")
        }
        save_file(state, path)
    finally:
        module.ema.restore(module.unet.parameters())


def load_ema_weights(module: LatentDiffusionModule, path: Path) -> LatentDiffusionModule:
    """Inverse of ``save_ema_weights`` (safetensors: no code runs on load)."""
    result = module.load_state_dict(load_file(path), strict=False)
    missing = [k for k in result.missing_keys if k.split(".")[0] in ("unet", "conditioner")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path} does not match this model: missing {missing}, unexpected {result.unexpected_keys}")
    # The loaded weights are the EMA weights: restart the average from them.
    module.ema = type(module.ema)(module.unet.parameters(), decay=module.params_.ema_decay)
    return module.eval()


def export_pipeline(
    module: LatentDiffusionModule,
    stage: FirstStage,
    scale: float,
    classes: list[str],
    directory: Path,
) -> Path | None:
    """A diffusers ``StableDiffusionPipeline`` directory: first stage (scaling_factor = the
    latent scale), EMA UNet, DDIM scheduler, and for text mode the MiniLM encoder and tokenizer.
    Class and unconditional models ship their context table (``contexts.safetensors``, rows
    named in ``contexts.json``), passed as ``prompt_embeds``; load them with
    ``StableDiffusionPipeline.from_pretrained(dir, text_encoder=None, tokenizer=None)``.
    Pixel-space models (f = 1) have no first stage to export."""
    from diffusers import StableDiffusionPipeline

    if not stage.trainable:
        return None
    directory = Path(directory)
    module.ema.store(module.unet.parameters())
    module.ema.copy_to(module.unet.parameters())
    try:
        stage.net.register_to_config(scaling_factor=scale)
        text = module.conditioner.mode == "text"
        encoder = tokenizer = None
        if text:
            from components.conditioning import TextEncoder

            loaded = TextEncoder(module.params_.max_text_tokens)
            encoder, tokenizer = loaded.model, loaded.tokenizer
        pipeline = StableDiffusionPipeline(
            vae=stage.net,
            text_encoder=encoder,
            tokenizer=tokenizer,
            unet=module.unet,
            scheduler=module.sampling_scheduler("ddim"),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.save_pretrained(directory, safe_serialization=True)
    finally:
        module.ema.restore(module.unet.parameters())
    if not text:
        save_file({"contexts": module.conditioner.table.detach().contiguous()}, directory / "contexts.safetensors")
        labels = classes if module.conditioner.mode == "class" else []
        (directory / "contexts.json").write_text(json.dumps({"rows": [*labels, "<unconditional>"]}, indent=2))
    return directory
