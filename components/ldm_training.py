"""Training, sample grids and the diffusers pipeline export around ``LatentDiffusionModule``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as L
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from components import distributed
from components.conditioning import Conditioner
from components.diffusion import LatentDiffusionModule
from components.first_stage import Autoencoder, FirstStage
from components.grids import labeled_grid
from components.images import to_pil
from components.params import LDMParams
from components.precision import decide
from components.tasks import complete, task_inputs
from components.training import fit, make_trainer


def sample_grid(
    module: LatentDiffusionModule, stage: FirstStage, rows: list[tuple[str, int]], per_row: int, seed: int = 0
) -> Image.Image:
    """One row per (label, condition index): ``per_row`` samples each, decoded to pixels."""
    cond = torch.tensor([index for _, index in rows for _ in range(per_row)])
    latents = module.sample(cond, generator=torch.Generator().manual_seed(seed))
    pil = to_pil(stage.decode_latents(latents.cpu()))
    return labeled_grid([(label, pil[r * per_row : (r + 1) * per_row]) for r, (label, _) in enumerate(rows)])


def task_grid(
    module: LatentDiffusionModule,
    stage: FirstStage,
    ldm: LDMParams,
    images: torch.Tensor,
    cond: torch.Tensor,
    seed: int = 0,
) -> Image.Image:
    """For a task that is given an image: its input, the model's output and the original, a row each."""
    inputs = task_inputs(ldm, images, stage, seed)
    latents = module.sample(cond, concat=inputs.concat, generator=torch.Generator().manual_seed(seed))
    outputs = complete(stage.decode_latents(latents.cpu()), images, inputs)
    rows = (("input", inputs.shown), ("output", outputs), ("original", images))
    return labeled_grid([(label, to_pil(row)) for label, row in rows])


def flops_per_step(
    module: LatentDiffusionModule, latents: torch.Tensor, cond: torch.Tensor, concat: torch.Tensor | None = None
) -> int:
    """Forward + backward FLOPs of one training step (torch.utils.flop_counter)."""
    counter = FlopCounterMode(display=False)
    with counter:
        module.loss(latents, cond, concat).backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def train_ldm(
    module: LatentDiffusionModule,
    ldm: LDMParams,
    latents: torch.Tensor,
    cond: torch.Tensor,
    concat: torch.Tensor | None = None,
    *,
    checkpoint_dir: Path,
    seed: int,
    precision: str | None = None,
    callbacks: list[L.Callback] = (),
) -> LatentDiffusionModule:
    """Train (or resume) on cached latents; ``callbacks`` report (see ``components.mlflow_callbacks``).
    ``precision``: as the run decided it (``components.precision``); None decides here.
    ``concat``: the task's image condition of each latent (``components.tasks``)."""
    precision = precision or decide(ldm.precision, "ldm", latents.shape[-1]).value
    L.seed_everything(seed, verbose=False)
    data = TensorDataset(latents, cond) if concat is None else TensorDataset(latents, cond, concat)
    loader = DataLoader(data, batch_size=ldm.batch_size, shuffle=True, drop_last=True)
    h, conditioner = module.hparams, module.conditioner
    rank_args = {
        "model": {name: h[name] for name in ("ldm", "channels", "size", "num_classes", "condition_channels")},
        "budget": ldm.model_dump(mode="json"),  # (a resumed run may train longer than its model was built for)
        "conditioning": conditioner.mode,
        "context_dim": conditioner.dim,
        "checkpoint_dir": str(checkpoint_dir),
        "seed": seed,
        "precision": precision,
    }
    tensors = {"latents": latents, "cond": cond} | ({} if concat is None else {"concat": concat})
    if conditioner.mode == "text":  # a fixed table, not a parameter that DDP would hand over
        tensors["text_states"] = conditioner.table
    with distributed.ranks(ldm.devices, Path(checkpoint_dir) / "ranks", f"{__name__}:train_rank", rank_args, tensors):
        trainer = make_trainer(ldm, checkpoint_dir, list(callbacks), precision, section="ldm")
        fit(trainer, module, loader, checkpoint_dir)
    return module


def train_rank(args: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """What ``distributed.ranks`` runs in each other training process: the same training,
    unreported. The weights need not match rank 0's here: DDP hands rank 0's to every rank."""
    model = args["model"]
    conditioner = Conditioner(
        args["conditioning"], model["num_classes"], args["context_dim"], tensors.get("text_states")
    )
    module = LatentDiffusionModule(**model, conditioner=conditioner)
    ldm = LDMParams.model_validate(args["budget"])
    checkpoint_dir = Path(args["checkpoint_dir"])
    train_ldm(
        module,
        ldm,
        tensors["latents"],
        tensors["cond"],
        tensors.get("concat"),
        checkpoint_dir=checkpoint_dir,
        seed=args["seed"],
        precision=args["precision"],
    )


# diffusers' StableDiffusionInpaintPipeline stacks the noisy latent, the mask and the masked image's
# latent, as latentlab does, but takes a UNet of 9 input channels only (4 + 1 + 4).
INPAINT_PIPELINE_CHANNELS = 4


def exports_pipeline(task: str, stage: FirstStage) -> bool:
    """Whether a diffusers pipeline runs this LDM: generation on any autoencoder (through
    ``StableDiffusionPipeline``), inpainting where the latent has 4 channels (f=8 by default;
    ``StableDiffusionInpaintPipeline``). Not f=1 (no first stage), not super-resolution:
    ``LDMSuperResolutionPipeline`` calls its UNet without the ``encoder_hidden_states`` every
    latentlab UNet (``UNet2DConditionModel``) takes, and decodes unscaled latents."""
    if not isinstance(stage, Autoencoder):
        return False
    return task == "generate" or (task == "inpaint" and stage.latent_channels == INPAINT_PIPELINE_CHANNELS)


def export_pipeline(module: LatentDiffusionModule, stage: Autoencoder, classes: list[str], directory: Path) -> Path:
    """A diffusers pipeline directory: ``StableDiffusionPipeline`` for generation,
    ``StableDiffusionInpaintPipeline`` for inpainting (see ``exports_pipeline``). First stage
    (scaling_factor = the latent scale), EMA UNet, DDIM scheduler, and for text mode the MiniLM
    encoder and tokenizer. Class and unconditional models ship their context table
    (``contexts.safetensors``, rows named in ``contexts.json``), passed as ``prompt_embeds``; load
    them with ``from_pretrained(dir, text_encoder=None, tokenizer=None)``."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    Pipeline = StableDiffusionInpaintPipeline if module.params_.task == "inpaint" else StableDiffusionPipeline

    directory = Path(directory)
    text = module.conditioner.mode == "text"
    encoder = tokenizer = None
    if text:
        from components.conditioning import TextEncoder

        loaded = TextEncoder(module.params_.max_text_tokens)
        encoder, tokenizer = loaded.model, loaded.tokenizer
    with module.ema_weights():
        pipeline = Pipeline(
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
    if not text:
        save_file({"contexts": module.conditioner.table.detach().contiguous()}, directory / "contexts.safetensors")
        labels = classes if module.conditioner.mode == "class" else []
        (directory / "contexts.json").write_text(json.dumps({"rows": [*labels, "<unconditional>"]}, indent=2))
    return directory
