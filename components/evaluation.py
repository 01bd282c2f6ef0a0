"""Sample quality of a latent diffusion model: sampling, FID-type metrics, the DDIM curve.

Samples are drawn with the conditions of the reference images (class mode: the reference's
label distribution), decoded to pixels and compared with the real images through
``components.metrics.Reference``. Below ``SMALL_SAMPLE`` samples FID is biased upward
(Heusel et al.; Chong & Forsyth 2020), which every caller states next to the number.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from components import workspace  # noqa: E402
from components.dataset import load_split  # noqa: E402
from components.diffusion import LatentDiffusionModule  # noqa: E402
from components.features import INCEPTION_ENV, Extractor  # noqa: E402
from components.first_stage import FirstStage  # noqa: E402
from components.grids import labeled_grid  # noqa: E402
from components.images import to_pil  # noqa: E402
from components.metrics import Reference, kid_with_interval, psnr_ssim  # noqa: E402
from components.params import EvalParams, LDMParams, Params  # noqa: E402
from components.progress import track  # noqa: E402
from components.tasks import TaskInputs, complete, task_inputs  # noqa: E402

SMALL_SAMPLE = 5000  # torch-fidelity / paper practice: FID from fewer samples is biased upward


@dataclass
class Samples:
    images: torch.Tensor  # uint8
    seconds: float
    cond: torch.Tensor  # the condition index of each image
    originals: torch.Tensor | None = None  # tasks given an image: the image each output is made from
    inputs: TaskInputs | None = None  # and what the model was given

    @property
    def img_per_s(self) -> float:
        return len(self.images) / max(self.seconds, 1e-9)


def generate(
    module: LatentDiffusionModule,
    stage: FirstStage,
    cond: torch.Tensor,
    *,
    steps: int,
    concat: torch.Tensor | None = None,
    sampler: str = "ddim",
    eta: float = 0.0,
    guidance_scale: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    label: str = "Sampling",
) -> Samples:
    """Images for ``cond`` (``sampler`` with ``steps``), decoded; timed end to end (denoise + decode).
    ``concat``: the task's image condition of each (``components.tasks``)."""
    generator = torch.Generator().manual_seed(seed)
    chunks, started = [], time.perf_counter()
    concats = [None] * len(cond.split(batch_size)) if concat is None else concat.split(batch_size)
    batches = list(zip(cond.split(batch_size), concats, strict=True))
    for batch, stacked in track(batches, f"{label} ({steps} {sampler.upper()} steps)"):
        latents = module.sample(
            batch,
            concat=stacked,
            steps=steps,
            sampler=sampler,
            eta=eta,
            guidance_scale=guidance_scale,
            generator=generator,
        )
        chunks.append(stage.decode_latents(latents.cpu()))
    return Samples(torch.cat(chunks), time.perf_counter() - started, cond)


@dataclass
class CurvePoint:
    steps: int
    fid: float
    kid_mean: float
    img_per_s: float


def ddim_curve(sample: Callable[[int], Samples], reference: Reference, step_counts: list[int]) -> list[CurvePoint]:
    """KID (and FID) against sampling throughput over DDIM step counts (the paper's Figure 7).
    Its points hold fewer samples than FID needs for the extractor's dimension: KID is the one
    read (plotted, reported); FID is logged for comparison with runs that have more."""
    points = []
    for steps in sorted(step_counts):
        samples = sample(steps)
        metrics = reference.score(samples.images, full=False)
        points.append(CurvePoint(steps, metrics["fid"], metrics["kid_mean"], samples.img_per_s))
    return points


def plot_curve(points: list[CurvePoint], title: str) -> Image.Image:
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    ax.plot([p.img_per_s for p in points], [p.kid_mean for p in points], "o-")
    for p in points:
        ax.annotate(f"{p.steps}", (p.img_per_s, p.kid_mean), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("sampling throughput (img/s, log)")
    ax.set_ylabel("KID")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.canvas.draw()
    image = Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB")
    plt.close(fig)
    return image


def small_sample_note(n: int) -> str | None:
    if n >= SMALL_SAMPLE:
        return None
    return f"FID from {n} samples (< {SMALL_SAMPLE}) is biased upward; compare KID, which is unbiased"


# --- the evaluation policy: which network scores, against which images, with which samples ------


def uses_inception(ev: EvalParams) -> bool:
    """``eval.extractor``: auto = Inception when its weights are given (param or env), else the
    offline domain CNN."""
    weights = ev.inception_weights or os.environ.get(INCEPTION_ENV)
    return ev.extractor == "inception" or (ev.extractor == "auto" and bool(weights))


def reference_split(ev: EvalParams) -> str:
    """``eval.reference_split``; auto: images the feature network never saw. The domain
    extractor trains on the train split and would reward memorising it, so it is scored
    against val; Inception never saw this data, so train, as the paper."""
    if ev.reference_split != "auto":
        return ev.reference_split
    return "train" if uses_inception(ev) else "val"


def reference(extractor: Extractor, data_version: str, split: str, cond: torch.Tensor | None = None) -> Reference:
    """The real images of ``split`` in ``data/``, with their condition indices (else all 0), to
    compare samples with; their features are cached per data version, split and extractor."""
    images, _ = load_split(workspace.data_dir(), split)
    indices = cond if cond is not None else torch.zeros(len(images), dtype=torch.long)
    return Reference.of(
        images, indices, extractor, data_version=data_version, split=split, cache_dir=workspace.fidelity_cache()
    )


@dataclass
class Draw:
    """What ``n`` samples are made from: reference images drawn with replacement, their
    conditions, and for a task given an image, the images and the task's inputs."""

    cond: torch.Tensor
    originals: torch.Tensor | None
    inputs: TaskInputs


def draw(real: Reference, n: int, seed: int, module: LatentDiffusionModule, stage: FirstStage) -> Draw:
    """``n`` draws from the reference for ``module``'s task (inputs seeded by ``seed``)."""
    pick, ldm = real.draw(n, seed), module.params_
    if ldm.task == "generate":  # (the label distribution is all that samples take from the reference)
        return Draw(real.cond[pick], None, TaskInputs.nothing())
    originals = real.images[pick]
    return Draw(real.cond[pick], originals, task_inputs(ldm, originals, stage, seed))


def sample_for(
    module: LatentDiffusionModule,
    stage: FirstStage,
    drawn: Draw,
    *,
    steps: int,
    seed: int,
    sampler: str = "ddim",
    eta: float = 0.0,
    guidance_scale: float = 1.0,
    batch_size: int = 64,
) -> Samples:
    """Images for ``drawn``, completed as the task delivers them (``tasks.complete``)."""
    samples = generate(
        module,
        stage,
        drawn.cond,
        steps=steps,
        concat=drawn.inputs.concat,
        sampler=sampler,
        eta=eta,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        seed=seed,
    )
    if drawn.originals is not None:
        samples.images = complete(samples.images, drawn.originals, drawn.inputs)
        samples.originals, samples.inputs = drawn.originals, drawn.inputs
    return samples


def sample_as_told(
    module: LatentDiffusionModule,
    stage: FirstStage,
    drawn: Draw,
    ev: EvalParams,
    seed: int,
    steps: int,
    sampler: str = "ddim",
) -> Samples:
    """Images for ``drawn``, sampled as the ``eval`` section says."""
    return sample_for(
        module,
        stage,
        drawn,
        steps=steps,
        seed=seed,
        sampler=sampler,
        eta=ev.eta,
        guidance_scale=ev.guidance_scale,
        batch_size=ev.batch_size,
    )


def budget_evaluation(
    module: LatentDiffusionModule, stage: FirstStage, params: Params, real: Reference
) -> Callable[[], dict[str, float]]:
    """KID of ``ldm.budget_samples`` fresh samples against the reference, with its bootstrap
    interval: one point of the budget curve (the paper's Figure 6). KID, not FID: it is unbiased
    at any sample count, and these are fewer than FID needs for the extractor's dimension."""
    ldm, ev = params.ldm, params.eval

    def evaluate() -> dict[str, float]:
        drawn = draw(real, ldm.budget_samples, params.seed, module, stage)
        samples = sample_for(
            module,
            stage,
            drawn,
            steps=ldm.budget_sample_steps,
            guidance_scale=ev.guidance_scale,
            batch_size=ev.batch_size,
            seed=params.seed,
        )
        real_features, fake_features = real.features(samples.images)
        return kid_with_interval(
            real_features, fake_features, rounds=ev.bootstrap_rounds, confidence=ev.confidence, seed=params.seed
        )

    return evaluate


def kid_at_larger_size(
    module: LatentDiffusionModule, stage: FirstStage, real: Reference, ev: EvalParams, seed: int, times: int = 2
) -> tuple[dict[str, float], torch.Tensor]:
    """How quality holds beyond the training size (the paper's Section 4.3.2): ``eval.large_samples``
    samples from a latent ``times`` larger on each side, scored by KID of one random crop of
    the training size each (``kid_<times>x`` with its interval; one crop per sample, so the
    bootstrap's draws stay independent). Returns the scores and the large images."""
    cond = real.conditions(ev.large_samples, seed=seed + 2)
    generator = torch.Generator().manual_seed(seed)
    size = module.unet.config.sample_size * times
    chunks = []
    for batch in track(cond.split(ev.batch_size), f"Sampling at {times}x the size ({ev.sample_steps} steps)"):
        latents = module.sample(
            batch,
            size=size,
            steps=ev.sample_steps,
            sampler=ev.sampler,
            eta=ev.eta,
            guidance_scale=ev.guidance_scale,
            generator=generator,
        )
        chunks.append(stage.decode_latents(latents.cpu()))
    large = torch.cat(chunks)
    side = real.images.shape[-1]
    corners = torch.randint(large.shape[-1] - side + 1, (len(large), 2), generator=generator).tolist()
    crops = torch.stack([image[:, y : y + side, x : x + side] for image, (y, x) in zip(large, corners, strict=True)])
    real_features, fake_features = real.features(crops)
    kid = kid_with_interval(
        real_features, fake_features, rounds=ev.bootstrap_rounds, confidence=ev.confidence, seed=seed
    )
    name = f"kid_{times}x"
    return {name: kid["kid_mean"], f"{name}_ci_low": kid["kid_ci_low"], f"{name}_ci_high": kid["kid_ci_high"]}, large


def samples_grid(samples: Samples, classes: list[str] | None, per_row: int = 8) -> Image.Image:
    """Generated images grouped by their class (``classes``: class mode), else in rows; for a task
    given an image, rows of inputs, outputs and originals."""
    if samples.originals is not None:
        rows = (("input", samples.inputs.shown), ("output", samples.images), ("original", samples.originals))
        return labeled_grid([(label, to_pil(row[:per_row])) for label, row in rows])
    pil = to_pil(samples.images)
    cond = samples.cond.tolist()
    if classes is not None:
        rows = [
            (name, [pil[i] for i, c in enumerate(cond) if c == index][:per_row]) for index, name in enumerate(classes)
        ]
        return labeled_grid([row for row in rows if row[1]])
    return labeled_grid([("samples", pil[i : i + per_row]) for i in range(0, min(len(pil), 64), per_row)])


# --- the measures of a task given an image ----------------------------------------------------------


def task_scores(
    ldm: LDMParams, originals: torch.Tensor, outputs: torch.Tensor, inputs: TaskInputs, *, confidence: float, seed: int
) -> dict[str, float]:
    """The task's own measures beside FID/KID (``contract.TASK_METRICS``), with a percentile-bootstrap
    interval over images for the first. superres: PSNR and SSIM against the high-resolution image
    (Table 5; ``sr_``: an evaluate run also carries its autoencoder's reconstruction PSNR), and
    bicubic upsampling's PSNR, the baseline a model must beat. inpaint: the error inside the holes
    (L1 on [0, 1] and the PSNR of the hole pixels), the same for the baseline a model must beat
    (each hole filled with the mean colour of its image's known pixels: pixel errors reward a
    blur, and this is the blurriest fill) and the share of pixels that were holes."""
    if ldm.task == "superres":
        scores = {f"sr_{name}": value for name, value in psnr_ssim(originals, outputs).items()}
        scores["sr_psnr_bicubic"] = float(_psnr_per_image(originals, inputs.shown).mean())
        return scores | _interval("sr_psnr", _psnr_per_image(originals, outputs), confidence, seed)
    if ldm.task == "inpaint":
        hole = inputs.masks.bool().expand_as(originals)
        l1, psnr = _hole_errors(originals, outputs, hole)
        base_l1, base_psnr = _hole_errors(originals, mean_fill(originals, hole), hole)
        scores = {
            "mask_l1": float(l1.mean()),
            "mask_psnr": float(psnr.mean()),
            "mask_l1_mean_fill": float(base_l1.mean()),
            "mask_psnr_mean_fill": float(base_psnr.mean()),
            "mask_share": float(hole.float().mean()),
        }
        return scores | _interval("mask_l1", l1, confidence, seed)
    return {}


def mean_fill(images: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """uint8 ``images`` with each hole (``hole``, bool like them) the mean colour of the rest."""
    known = ~hole
    colour = (images.float() * known).flatten(2).sum(2) / known.flatten(2).sum(2).clamp(min=1)
    return torch.where(hole, colour[..., None, None].round().to(images.dtype), images)


def _hole_errors(
    originals: torch.Tensor, outputs: torch.Tensor, hole: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the L1 (on [0, 1]) and the PSNR of ``outputs`` inside ``hole``."""
    error = (outputs.float() - originals.float()).abs() / 255
    counts = hole.flatten(1).sum(1).clamp(min=1)
    l1 = (error * hole).flatten(1).sum(1) / counts
    mse = (error**2 * hole).flatten(1).sum(1) / counts
    return l1, (10 * torch.log10(1 / mse.clamp(min=1e-10))).clamp(max=100)


def _psnr_per_image(originals: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    mse = ((outputs.float() - originals.float()) / 255).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1 / mse.clamp(min=1e-10))).clamp(max=100)


def _interval(name: str, values: torch.Tensor, confidence: float, seed: int, rounds: int = 1000) -> dict[str, float]:
    """A percentile bootstrap interval of the mean of per-image ``values``."""
    x = values.double().numpy()
    picks = np.random.default_rng(seed).integers(len(x), size=(rounds, len(x)))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(x[picks].mean(axis=1), [tail, 100 - tail])
    return {f"{name}_ci_low": float(low), f"{name}_ci_high": float(high)}
