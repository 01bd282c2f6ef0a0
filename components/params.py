"""Parameter schema: every knob of every stage, validated before any work starts.

Presets live in ``params/*.yaml`` and are read by ``components.presets`` (layered, with the
CLI's ``--set dotted.key=value`` on top). A value the schema rejects becomes one ``UserError``
that names the key and how to fix it (``describe``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from components import safe_yaml
from components.credentials import holds_credentials, redact
from components.errors import UserError
from components.workspace import PARAMS_FILE

FACTORS = (1, 2, 4, 8, 16, 32)
UNLIMITED_STEPS = 10**9  # a time budget's step cap
MAX_SEED = 2**32 - 1  # numpy's and Lightning's seeds are 32-bit
# Upper bounds that catch a typo (an extra digit) before it allocates or spawns without end; each
# is far above any setting this project's hardware or the paper's recipe would use.
MAX_DEVICES = 64
MAX_BASE_CHANNELS = 1024  # paper: 128
MAX_TIMESTEPS = 100_000  # paper: 1000
MAX_BOOTSTRAP_ROUNDS = 100_000  # default 200
MAX_LISTED = 10  # problems listed in one parameter error


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def downsampling_levels(factor: int) -> int:
    """m for f = 2^m: the first stage's downsampling levels (it has m + 1 resolution blocks)."""
    return factor.bit_length() - 1


def reporting(default: Any, **field: Any) -> Any:
    """A field that changes how a run reports (log intervals, grids, where it runs), not what it
    learns: left out of run keys (``Section.shaping``), so changing it reuses trained models."""
    return Field(default, json_schema_extra={"reporting": True}, **field)


class Section(BaseModel):
    # Unknown keys are typos, never silently ignored; 1.0e+400 reads as infinity, never a value.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    def shaping(self) -> dict[str, Any]:
        """The section's values that shape a result (every field not declared ``reporting``)."""
        extra = {name: f.json_schema_extra or {} for name, f in type(self).model_fields.items()}
        return self.model_dump(mode="json", exclude={name for name, e in extra.items() if e.get("reporting")})


class DataParams(Section):
    source: Literal["openmoji", "folder"] = Field(
        "openmoji",
        description="openmoji: the emoji embedded in the installed package; folder: your images in data.path",
    )
    path: Path | None = Field(None, description="image folder, for source=folder")
    resolution: int = Field(64, description="square side in pixels, a power of two, 8..256")
    val_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="share of images held out as the val split (whole near-duplicate groups: docs/data.md)",
    )
    strict: bool = Field(False, description="fail on any bad file instead of skipping it")
    upscale: bool = Field(False, description="upscale images smaller than the resolution")
    max_per_class: int | None = Field(None, ge=1, description="cap per class (quick runs)")
    remote: str = Field("dvc-remote", description="DVC remote: a directory or s3://bucket/path")
    remote_endpoint: str | None = Field(None, description="S3-compatible endpoint URL")
    grid_per_class: int = reporting(8, ge=1, le=32, description="images per class in the data run's sample grid")

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, v: int) -> int:
        if not (_is_power_of_two(v) and 8 <= v <= 256):
            raise ValueError("must be a power of two from 8 to 256 (e.g. 64)")
        return v

    @model_validator(mode="after")
    def _folder_needs_path(self) -> DataParams:
        if self.source == "folder" and self.path is None:
            raise ValueError("source=folder needs data.path: add --set data.path=DIR")
        return self


class TrainingBudget(Section):
    """How long a stage trains: steps, and optionally a wall-time cap; how often it reports."""

    batch_size: int = Field(16, ge=1, description="images per optimisation step (per process)")
    lr: float = Field(3e-4, gt=0, description="learning rate (Adam)")
    max_steps: int = Field(400, ge=1, description="optimisation steps (batches)")
    max_minutes: float | None = Field(None, gt=0, description="wall-time cap, resumable")
    log_every: int = reporting(10, ge=1, description="steps between logged training metrics")
    image_every: int = reporting(500, ge=1, description="steps between image grids")
    checkpoint_every: int = reporting(100, ge=1, description="steps between resumable checkpoints")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="cosine: decay the learning rate to 0 over the budget (steps or minutes)"
    )
    checkpoint_minutes: float = reporting(
        0, ge=0, description="and at least this many minutes between them (a save costs ~0.2 s: not every few steps)"
    )
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = Field(
        "auto", description="auto: bf16-mixed where the hardware has bf16 and it pays for this model (measured)"
    )
    accelerator: Literal["auto", "cpu", "cuda"] = reporting("auto", description="where it trains (auto: a GPU if any)")
    devices: int = Field(
        1,
        ge=1,
        le=MAX_DEVICES,
        description="training processes; more than one: DDP (gloo on CPU, NCCL on CUDA), batch_size each",
    )


class AEParams(TrainingBudget):
    factor: int = Field(8, description="downsampling factor f = 2^m; 1 means pixel space")
    regularizer: Literal["kl", "vq"] = Field("kl", description="latent regularizer: kl (AutoencoderKL) or vq (VQModel)")
    latent_channels: int | None = Field(None, ge=1, description="default by f, as the paper")
    base_channels: int = Field(16, ge=8, le=MAX_BASE_CHANNELS, description="paper: 128; 16 fits a 2-core CPU")
    channel_mult: list[int] = Field([1, 2, 4, 4, 4, 4], description="width per level, m + 1 used")
    layers_per_block: int = Field(1, ge=1, description="ResNet blocks per resolution level")
    attention: bool = Field(True, description="self-attention in the middle block")
    codebook_size: int = Field(256, ge=2, description="VQ codebook entries")
    # l2 raises PSNR, which it minimises by construction, but not the samples' KID (docs/results.md).
    pixel_loss: Literal["l1", "l2"] = Field("l1", description="per-pixel reconstruction loss (paper: l1)")
    kl_weight: float = Field(1e-6, ge=0, description="relative to the per-pixel reconstruction loss, as CompVis")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="the paper's GAN setting: [0.5, 0.9]")
    channels_per_group: int = Field(4, ge=1, description="GroupNorm channels per group (CompVis: 4 or more)")
    channels_last: bool = Field(True, description="NHWC memory layout for the convolutions")
    codebook_weight: float = Field(1.0, ge=0, description="weight of the VQ codebook loss (regularizer=vq)")
    perceptual: Literal["auto", "lpips", "ssim"] = Field("auto", description="auto: LPIPS if VGG is on disk")
    perceptual_weight: float = Field(1.0, ge=0, description="weight of the perceptual loss (0: none)")
    lpips_vgg_weights: str | None = Field(None, description="local torchvision vgg16 weights file")
    disc_start: int = Field(50_001, ge=0, description="step at which the discriminator starts (CompVis: 50,001)")
    disc_weight: float = Field(
        0.5, ge=0, description="weight of the patch discriminator's loss once it starts (0: none)"
    )

    @field_validator("factor")
    @classmethod
    def _factor(cls, v: int) -> int:
        if v not in FACTORS:
            raise ValueError(f"must be a power of two among {', '.join(map(str, FACTORS))}")
        return v

    @model_validator(mode="after")
    def _enough_levels(self) -> AEParams:
        levels = downsampling_levels(self.factor)
        if len(self.channel_mult) < levels + 1:
            raise ValueError(f"ae.channel_mult needs at least {levels + 1} entries for f={self.factor}")
        return self


class LDMParams(TrainingBudget):
    lr: float = Field(
        1e-3,
        gt=0,
        description="learning rate (AdamW); 1e-3 reaches in CPU minutes the loss 2e-4 needs ~2x the steps for",
    )
    task: Literal["generate", "superres", "inpaint"] = Field(
        "generate",
        description="generate: from noise; superres / inpaint: from an image stacked on the denoiser's input "
        "(concatenation, the paper's Tables 5 and 6); conditioning rides along by cross-attention (hybrid)",
    )
    superres_scale: int = Field(4, ge=2, le=16, description="superres: the upscaling factor (paper: 4)")
    superres_degradation: Literal["bicubic", "blur_noise"] = Field(
        "bicubic", description="superres: how the low-resolution input is made (blur_noise: a light BSR-style one)"
    )
    inpaint_masks: Literal["mixed", "boxes", "strokes"] = Field(
        "mixed", description="inpaint: the holes drawn at random (seeded): boxes, free-form strokes, or either"
    )
    conditioning: Literal["class", "text", "none"] = Field("class", description="cross-attention context")
    widths: list[int] = Field([64, 128, 128], description="UNet block widths, one per level")
    layers_per_block: int = Field(1, ge=1, description="ResNet blocks per UNet level")
    attention_max_size: int = Field(16, ge=1, description="cross-attention only at latent sizes <= this")
    context_dim: int = Field(128, ge=8, description="class/null embedding width (text: the encoder's)")
    max_text_tokens: int = Field(16, ge=4, description="caption tokens kept (conditioning=text)")
    timesteps: int = Field(
        1000, ge=10, le=MAX_TIMESTEPS, description="diffusion steps of the noise schedule (paper: 1000)"
    )
    beta_start: float = Field(
        0.0015, gt=0, lt=1, description="first beta of the scaled-linear schedule (paper: 0.0015)"
    )
    beta_end: float = Field(0.0195, gt=0, lt=1, description="last beta of that schedule (paper: 0.0195)")
    # Measured (benchmarks/ldm_quality.py, equal steps): v-prediction with Min-SNR-5 reaches
    # FID 4.4-4.7 where the paper's plain epsilon loss is at 7.5-7.8 (f = 4, 8; KID intervals apart).
    prediction: Literal["epsilon", "v_prediction"] = Field(
        "v_prediction", description="the network's target (paper: epsilon; v converges faster here, measured)"
    )
    snr_gamma: float | None = Field(
        5.0, gt=0, description="Min-SNR-gamma loss weighting (Hang et al. 2023: 5); null: plain L2, as the paper"
    )
    uncond_prob: float = Field(0.1, ge=0, lt=1, description="label dropout, for classifier-free guidance")
    ema_decay: float = Field(
        0.999, gt=0, lt=1, description="decay of the weights' moving average (the EMA is what samples)"
    )
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    sampler: Literal["ddim", "ddpm"] = Field(
        "ddim", description="sampler of the run's sample grids and the registered model"
    )
    sample_steps: int = Field(50, ge=1, description="its steps")
    eta: float = Field(0.0, ge=0, description="its DDIM eta (0: deterministic)")
    guidance_scale: float = Field(2.0, ge=1.0, description="its classifier-free guidance (1: none)")
    samples_per_class: int = reporting(4, ge=1, description="per row of the sample grid")
    budget_points: int = reporting(
        4,
        ge=1,
        description="evaluations during training, at equal shares of its budget (time or steps, whichever "
        "binds), the last at the end: the budget curve, KID vs training time (Figure 6)",
    )
    budget_samples: int = reporting(
        250, ge=8, description="samples per evaluation during training (KID, unbiased at any count, with its interval)"
    )
    budget_sample_steps: int = reporting(10, ge=1, description="DDIM steps of those samples")

    @field_validator("widths")
    @classmethod
    def _widths_fit_group_norm(cls, v: list[int]) -> list[int]:
        groups = min(32, v[0]) if v and v[0] > 0 else 1
        if not v or any(w < 1 or w % groups for w in v):
            raise ValueError(
                f"every width must be a positive multiple of {groups}, the UNet's GroupNorm groups "
                "(min(32, first width)), e.g. [64, 128, 128]"
            )
        return v

    @model_validator(mode="after")
    def _steps_fit_the_schedule(self) -> LDMParams:
        if self.beta_start >= self.beta_end:
            raise ValueError(
                f"beta_start={self.beta_start} must be below beta_end={self.beta_end} (paper: 0.0015, 0.0195)"
            )
        for name in ("sample_steps", "budget_sample_steps"):
            if getattr(self, name) > self.timesteps:
                raise ValueError(f"{name}={getattr(self, name)} exceeds timesteps={self.timesteps}: pick at most that")
        return self


class EvalParams(Section):
    """Sample quality of a finished LDM run: FID, KID, precision/recall against real images."""

    extractor: Literal["auto", "domain", "inception"] = Field(
        "auto", description="auto: Inception when weights are given, else the trained domain CNN"
    )
    inception_weights: str | None = Field(None, description="local inception-v3-compat weights (or env var)")
    reference_split: Literal["auto", "train", "val"] = Field(
        "auto", description="auto: val for the domain extractor (trained on train), train for Inception (the paper)"
    )
    samples: int = Field(1000, ge=8, description="samples for the headline metrics")
    sampler: Literal["ddim", "ddpm"] = Field("ddim", description="for the headline metrics (the curve is DDIM)")
    sample_steps: int = Field(50, ge=1, description="sampler steps for the headline metrics")
    eta: float = Field(0.0, ge=0, description="DDIM eta for the headline metrics (0: deterministic)")
    guidance_scale: float = Field(1.0, ge=1.0, description="1: no guidance, as the paper's factor ablation")
    batch_size: int = Field(64, ge=1, description="samples drawn at once")
    ddim_steps: list[int] = Field([10, 20, 50, 100, 200], description="FID vs throughput curve (Figure 7)")
    curve_samples: int = Field(250, ge=8, description="samples per point of that curve")
    large_samples: int = Field(
        32,
        ge=0,
        description="generation: samples drawn at twice the training size (a latent twice as large on each side), "
        "scored by KID of one training-size crop each (the paper's Section 4.3.2); 0: none",
    )
    extractor_steps: int = Field(600, ge=1, description="training steps of the domain extractor")
    bootstrap_rounds: int = Field(
        200, ge=0, le=MAX_BOOTSTRAP_ROUNDS, description="bootstrap rounds for FID/KID intervals (0: none)"
    )
    confidence: float = Field(0.95, gt=0, lt=1, description="level of those intervals")


class SweepParams(Section):
    """Which factors, and the budget that makes their comparison fair. The sweep has its own
    per-factor budget: six factors must share an hour, while a single ``train-ldm`` run (the
    ``ae``/``ldm`` budgets) may take longer to reach recognisable samples."""

    factors: list[int] = Field(list(FACTORS), description="downsampling factors to compare")
    budget: Literal["steps", "time"] = Field(
        "time", description="steps: every f trains ae_steps/ldm_steps; time: every f trains ae_minutes/ldm_minutes"
    )
    ae_steps: int = Field(400, ge=1, description="autoencoder steps per factor (budget=steps)")
    ldm_steps: int = Field(2000, ge=1, description="LDM steps per factor (budget=steps)")
    ae_minutes: float = Field(3, gt=0, description="autoencoder training minutes per factor (budget=time)")
    ldm_minutes: float = Field(3, gt=0, description="LDM training minutes per factor (budget=time)")
    workers: int = Field(1, ge=1, description="factors trained at once (threads; 1 on a small CPU)")
    seeds: int = Field(
        1,
        ge=1,
        description="training seeds per factor (seed, seed+1, ...), each its own runs; the report adds mean ± std",
    )

    @field_validator("factors")
    @classmethod
    def _factors(cls, v: list[int]) -> list[int]:
        bad = [f for f in v if f not in FACTORS]
        if bad or not v:
            raise ValueError(f"each factor must be one of {', '.join(map(str, FACTORS))} (got {v})")
        return sorted(set(v))


class ReproduceParams(Section):
    tolerance: float = Field(0.1, ge=0, description="relative difference accepted per metric")
    metrics: list[str] = Field(
        ["psnr", "ssim", "rfid", "fid", "kid_mean", "train_loss"], description="metrics compared, where present"
    )


class Params(Section):
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="seed of initialisation, batches and samples (the split is fixed by the data)"
    )
    data: DataParams = DataParams()
    ae: AEParams = AEParams()
    ldm: LDMParams = LDMParams()
    eval: EvalParams = EvalParams()
    sweep: SweepParams = SweepParams()
    reproduce: ReproduceParams = ReproduceParams()

    @model_validator(mode="after")
    def _no_credentials(self) -> Params:
        # Parameters reach MLflow, Prefect's database, DVC's config (committed to git) and reports.
        for key, value in self.flat().items():
            if isinstance(value, str) and holds_credentials(value):
                raise ValueError(
                    f"{key} holds credentials ({redact(value)}): leave them out of parameters and give them to "
                    "the client instead (for S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or ~/.aws)"
                )
        return self

    @model_validator(mode="after")
    def _factor_fits_image(self) -> Params:
        if self.seed + self.sweep.seeds - 1 > MAX_SEED:
            raise ValueError(
                f"seed + sweep.seeds - 1 must be at most {MAX_SEED} (seeds are 32-bit): pick a smaller seed"
            )
        # (sweep.factors are checked by for_factor, when a sweep starts)
        if self.ae.factor > self.data.resolution:
            raise ValueError(
                f"ae.factor={self.ae.factor} is larger than data.resolution="
                f"{self.data.resolution}: pick a factor of at most the image size"
            )
        if self.data.resolution < 16 and self.ae.disc_weight > 0 and self.ae.disc_start < self.ae.max_steps:
            raise ValueError(
                f"data.resolution={self.data.resolution} is too small for the patch discriminator, which starts "
                f"at ae.disc_start={self.ae.disc_start}: it needs 16 px; set ae.disc_weight=0 or a larger resolution"
            )
        if self.ldm.task == "superres" and self.data.resolution % self.ldm.superres_scale:
            raise ValueError(
                f"ldm.superres_scale={self.ldm.superres_scale} does not divide data.resolution="
                f"{self.data.resolution}: the low-resolution input would not have a whole size; pick a divisor"
            )
        steps = {"eval.sample_steps": [self.eval.sample_steps], "eval.ddim_steps": self.eval.ddim_steps}
        for name, values in steps.items():
            if not values or any(not 1 <= v <= self.ldm.timesteps for v in values):
                raise ValueError(f"{name} {values}: sampler steps must lie in 1..ldm.timesteps ({self.ldm.timesteps})")
        return self

    def for_factor(self, factor: int, repeat: int = 0) -> Params:
        """These parameters with ``ae.factor`` set, the seed of ``repeat`` (``seed + repeat``) and
        the sweep's budget as the stages' budgets: equal steps (no wall-time cap) or equal wall
        time (no step cap)."""
        tree = self.model_dump()
        tree["ae"]["factor"] = factor
        tree["seed"] = self.seed + repeat
        for stage in ("ae", "ldm"):
            if self.sweep.budget == "steps":
                tree[stage] |= {"max_steps": getattr(self.sweep, f"{stage}_steps"), "max_minutes": None}
            else:
                tree[stage] |= {"max_steps": UNLIMITED_STEPS, "max_minutes": getattr(self.sweep, f"{stage}_minutes")}
        try:
            return Params.model_validate(tree)
        except ValidationError as exc:
            raise UserError(f"For f={factor} in sweep.factors: {describe(exc, None)}") from None

    def budget_description(self) -> str:
        s = self.sweep
        if s.budget == "steps":
            return f"equal steps: ae {s.ae_steps}, ldm {s.ldm_steps} per factor"
        return f"equal wall time: ae {s.ae_minutes:g} min, ldm {s.ldm_minutes:g} min per factor"

    def shaping(self, name: str) -> Any:
        """What of ``name`` (a section, ``section.key`` or ``seed``) shapes a result, JSON-able."""
        head, _, key = name.partition(".")
        value = getattr(self, head)
        if key:
            return value.model_dump(mode="json", include={key})[key]
        return value.shaping() if isinstance(value, Section) else value

    def flat(self, *sections: str) -> dict[str, Any]:
        """Dotted-name view (``ae.factor``) as logged to MLflow, of some sections or all."""
        tree = self.model_dump(mode="json")
        return flatten({k: v for k, v in tree.items() if not sections or k in sections})


def field_descriptions(model: type[Section] = Params, prefix: str = "") -> dict[str, str]:
    """Dotted key -> what it means, for every key of the schema (``description`` beside each field)."""
    found: dict[str, str] = {}
    for name, f in model.model_fields.items():
        kind = f.annotation if isinstance(f.annotation, type) else None
        if kind is not None and issubclass(kind, Section):
            found |= field_descriptions(kind, f"{prefix}{name}.")
        else:
            found[f"{prefix}{name}"] = f.description or ""
    return found


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def params_from_run(
    logged: dict[str, str], keep: Params, sections: tuple[str, ...], complete: tuple[str, ...] = ()
) -> Params:
    """The parameters a run was trained with (MLflow's flattened strings), with ``sections``
    taken from ``keep`` instead (e.g. how to evaluate it). A key the run did not record takes
    its default, except in ``complete``: there a missing key is refused, because a default
    there would quietly build something else (``data``: another dataset, in the user's data/)."""
    missing = [key for key in (keep.flat(*complete) if complete else {}) if key not in logged]
    if missing:
        raise UserError(
            f"The run did not record {', '.join(missing[:5])}{' ...' * (len(missing) > 5)} (its parameters were "
            "not all logged), so what it was trained on cannot be rebuilt from them: `latentlab reproduce "
            "RUN_ID` restores its data version from DVC, or pass another run."
        )
    tree: dict[str, Any] = {}
    for key, raw in logged.items():
        value = None if raw == "None" else _logged_value(raw)
        *parents, leaf = key.split(".")
        if parents and parents[0] in sections:
            continue
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = raw if isinstance(value, (dict, type(None))) and raw != "None" else value
    for section in sections:
        tree[section] = getattr(keep, section).model_dump()
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        raise UserError(f"The run's recorded parameters no longer validate: {describe(exc, None)}") from None


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error names the value, never a whole file."""
    shown = repr(redact(value))
    return shown if len(shown) <= limit else f"{shown[: limit - 20]}... ({len(shown):,} characters)"


def describe(exc: ValidationError, path: Path | None) -> str:
    where = f" in {path}" if path else ""
    lines = []
    errors = exc.errors()
    for error in errors[:MAX_LISTED]:
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"unknown parameter; check the spelling against {PARAMS_FILE}"
        value = error.get("input")
        shown = "" if isinstance(value, dict) or error["type"] == "missing" else f" = {_short(value)}"
        lines.append(f"  {key}{shown}: {message}")
    if len(errors) > MAX_LISTED:
        lines.append(f"  ... and {len(errors) - MAX_LISTED} more")
    return (
        f"Invalid parameters{where}:\n"
        + "\n".join(lines)
        + "\nFix the value in the YAML file or override it with --set key=value."
    )


def _logged_value(raw: str) -> Any:
    """A logged parameter read back as YAML (``8``, ``[1, 2]``), or the string itself where it is
    not YAML (an alias, as anyone with access to the store could write in: not expanded)."""
    try:
        return safe_yaml.load(raw)
    except yaml.YAMLError:
        return raw
