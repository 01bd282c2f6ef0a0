"""Image-quality metrics: PSNR/SSIM (torchmetrics), FID/KID/precision/recall/IS (torch-fidelity).

torch-fidelity computes the sample metrics so the numbers are the library's, not a rewrite;
``components.features`` says which network the features come from.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from torch_fidelity.metric_fid import (
    KEY_METRIC_FID,
    fid_features_to_statistics,
    fid_featuresdict_to_statistics,
    fid_statistics_to_metric,
)
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kernel_poly, kid_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric
from torch_fidelity.utils import (
    create_feature_extractor,
    extract_featuresdict_from_input_id,
    resolve_feature_layer_for_metric,
)
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from components import workspace
from components.errors import UserError
from components.features import INCEPTION, Extractor

MIN_SAMPLES = 2  # FID needs a covariance, KID a pair per subset, precision/recall one neighbour
PRC_NEIGHBORHOOD = 3  # k of Kynkäänniemi et al. 2019; smaller only when a set has <= 3 images
KID_REAL = 1000  # reference images in the bootstrap's KID (its kernel grows with the square)

log = logging.getLogger("latentlab")


class _Images(Dataset):
    """uint8 [N, 3, H, W] as the per-image dataset torch-fidelity reads."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def reference_name(data_version: str, split: str, extractor: Extractor) -> str:
    """Cache name of a reference set's features: torch-fidelity keys its cache by this name only."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"{data_version}-{split}-{extractor.cache_key}")


def sample_metrics(
    real: torch.Tensor,
    fake: torch.Tensor,
    extractor: Extractor,
    *,
    reference: str | None = None,
    cache_dir: Path | None = None,
    prc: bool = True,
    isc: bool = False,
    bootstrap: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """FID, KID (and precision/recall, Inception Score) of ``fake`` against ``real``.

    ``bootstrap`` > 0 adds ``confidence`` intervals for FID and KID (``fid_ci_low`` ...) from
    that many bootstrap rounds over both sets' features (``bootstrap_intervals``).

    Both are uint8 [N, 3, H, W] with N >= 2. KID uses subsets of min(1000, N_real, N_fake);
    precision/recall use k = 3 neighbours, fewer only when a set has fewer than 4 images.
    With ``reference`` and ``cache_dir`` the real set's features are cached under that name
    (make it say which data, split and extractor: ``reference_name``) and a later call with the
    same name reuses them without looking at ``real``; the fake set is never cached.
    ``isc`` is computed on the fake set, and only with an extractor that has logits.
    """
    for what, images in (("real", real), ("fake", fake)):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{what} images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if len(images) < MIN_SAMPLES:
            raise UserError(f"FID-type metrics need at least {MIN_SAMPLES} {what} images, got {len(images)}.")
    isc = isc and extractor.has_logits
    settings = {
        "kid_subset_size": min(1000, len(real), len(fake)),
        "prc_neighborhood": min(PRC_NEIGHBORHOOD, len(real) - 1, len(fake) - 1),
        "isc_splits": min(10, len(fake)),
        "save_cpu_ram": True,
        "verbose": False,
    }
    try:
        layers, real_features, fake_features = _features(real, fake, extractor, reference, cache_dir, isc=isc)
    except OSError as error:  # urllib's errors included
        if extractor.name != INCEPTION or extractor.weights_path is not None:
            raise
        raise UserError(
            f"Could not get torch-fidelity's {extractor.name} weights ({error}); downloading needs internet. "
            "Pass a local weights file (evaluation parameter or $LATENTLAB_INCEPTION_WEIGHTS), "
            "or use the offline domain extractor."
        ) from None
    # torch-fidelity's own metric functions on the features, with calculate_metrics' conventions
    # (input 1 the samples, input 2 the real images): the library's numbers.
    stats = [fid_featuresdict_to_statistics(f, layers["fid"]) for f in (fake_features, real_features)]
    result = fid_statistics_to_metric(*stats, verbose=False)
    result |= kid_featuresdict_to_metric(fake_features, real_features, layers["fid"], **settings)
    if prc:
        result |= prc_featuresdict_to_metric(fake_features, real_features, layers["fid"], **settings)
    if isc:
        result |= isc_featuresdict_to_metric(fake_features, layers["isc"], **settings)
    out = {
        "fid": float(result[KEY_METRIC_FID]),
        "kid_mean": float(result["kernel_inception_distance_mean"]),
        "kid_std": float(result["kernel_inception_distance_std"]),
    }
    if prc:
        out |= {"precision": float(result["precision"]), "recall": float(result["recall"])}
    if isc:
        out |= {"isc_mean": float(result["inception_score_mean"]), "isc_std": float(result["inception_score_std"])}
    if bootstrap:
        picked = real_features[layers["fid"]], fake_features[layers["fid"]]
        out |= bootstrap_intervals(*picked, rounds=bootstrap, confidence=confidence, seed=seed)
    return out


def feature_sets(
    real: torch.Tensor,
    fake: torch.Tensor,
    extractor: Extractor,
    *,
    reference: str | None = None,
    cache_dir: Path | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The real and fake sets' FID features [N, d], as torch-fidelity computes them (the real
    set's from the cache named ``reference`` when given): what every interval and the sweep's
    verdict resample."""
    layers, real_features, fake_features = _features(real, fake, extractor, reference, cache_dir)
    return real_features[layers["fid"]], fake_features[layers["fid"]]


def _features(
    real: torch.Tensor,
    fake: torch.Tensor,
    extractor: Extractor,
    reference: str | None,
    cache_dir: Path | None,
    *,
    isc: bool = False,
) -> tuple[dict[str, str], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({metric: layer}, the real set's features by layer, the fake set's), extracted by
    torch-fidelity. The real set's FID layer is cached under ``reference`` in ``cache_dir`` as
    safetensors: torch-fidelity's own cache unpickles what it reads, so it is not used."""
    if (reference is None) != (cache_dir is None):
        raise ValueError("caching the reference features needs both reference and cache_dir")
    inputs = dict(
        input1=_Images(fake),
        input2=_Images(real),
        feature_extractor=extractor.fidelity_name,
        feature_extractor_weights_path=extractor.weights_path,
        cuda=torch.cuda.is_available(),
        save_cpu_ram=True,  # no loader worker processes for in-memory tensors
        verbose=False,
        batch_size=64,
    )
    metrics = ("fid", "isc") if isc else ("fid",)
    layers = {metric: resolve_feature_layer_for_metric(metric, **inputs) for metric in metrics}
    cached = Path(cache_dir) / f"{reference}-{extractor.name}-{layers['fid']}.safetensors" if reference else None
    real_features = _read_cache(cached, layers["fid"]) if cached else None
    network = create_feature_extractor(inputs["feature_extractor"], sorted(set(layers.values())), **inputs)
    if real_features is None:
        real_features = {layers["fid"]: extract_featuresdict_from_input_id(2, network, **inputs)[layers["fid"]]}
        if cached:
            workspace.write_atomically(cached, lambda tmp: save_file(real_features, str(tmp)))
    return layers, real_features, extract_featuresdict_from_input_id(1, network, **inputs)


def _read_cache(path: Path, layer: str) -> dict[str, torch.Tensor] | None:
    """The cached features, or None when there are none or they are damaged (then recomputed)."""
    if not path.exists():
        return None
    try:
        features = load_file(str(path))
        if features[layer].ndim == 2 and torch.isfinite(features[layer]).all():
            return features
    except Exception:  # noqa: BLE001 - any damage means: compute them again
        pass
    log.warning("The cached reference features %s are damaged; computing them again", path)
    return None


def fid_of_features(real: np.ndarray, fake: np.ndarray) -> float:
    """torch-fidelity's Fréchet distance of two feature sets [N, d]."""
    stats = [fid_features_to_statistics(torch.from_numpy(f)) for f in (real, fake)]
    return float(fid_statistics_to_metric(*stats, verbose=False)[KEY_METRIC_FID])


def kid_of_features(real: np.ndarray, fake: np.ndarray) -> float:
    """Unbiased MMD^2 with KID's kernel (torch-fidelity's cubic polynomial), on the whole sets;
    unlike torch-fidelity's subset estimator it allows sets of different sizes."""
    kernels = _kid_kernels(real, fake)
    return _weighted_mmd2(*kernels, np.ones(len(real)), np.ones(len(fake)))


def kid_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KID's kernel between two feature sets: torch-fidelity's cubic polynomial (x.y / d + 1)^3."""
    return kernel_poly(a, b, kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)


def _kid_kernels(real: np.ndarray, fake: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return kid_kernel(real, real), kid_kernel(fake, fake), kid_kernel(real, fake)


def within_pairs(k: np.ndarray, c: np.ndarray) -> float:
    """Mean kernel over the distinct pairs of a set that holds image i ``c[i]`` times: pairs of
    copies of one image are left out like the diagonal, so a bootstrap resample is not biased up
    by its repeats. NaN where the set holds one distinct image: it has no such pair."""
    pairs = c.sum() ** 2 - (c**2).sum()
    return float((c @ k @ c - (c**2) @ np.diag(k)) / pairs) if pairs else float("nan")


def _weighted_mmd2(k_rr: np.ndarray, k_ff: np.ndarray, k_rf: np.ndarray, c_r: np.ndarray, c_f: np.ndarray) -> float:
    """Unbiased MMD^2 of sets that hold image i ``c[i]`` times (``within_pairs``)."""
    return within_pairs(k_rr, c_r) + within_pairs(k_ff, c_f) - 2 * float(c_r @ k_rf @ c_f) / (c_r.sum() * c_f.sum())


def bootstrap_intervals(
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    rounds: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    metrics: tuple[str, ...] = ("fid", "kid"),
) -> dict[str, float]:
    """``confidence`` intervals for FID and KID (or those of ``metrics``): both feature sets
    resampled with replacement ``rounds`` times (KID against a fixed subset of at most
    ``KID_REAL`` real images).

    FID: basic (reverse-percentile) bootstrap, [2 t - q_hi, 2 t - q_lo] around the estimate t, so
    the interval also corrects FID's upward bias at small N (resampling repeats images, which
    biases each round further up by about as much). KID: percentile bootstrap, [q_lo, q_hi]. KID
    is unbiased, and stays so in each round (``_weighted_mmd2``), so there is no bias to reflect,
    but its spread is skewed to the right, which reflecting would turn the wrong way: on simulated
    features at this project's sizes (tests/test_intervals.py, 400 trials, 494 real) the
    percentile interval covered the true KID 94.5 % / 94.8 % / 94.3 % of the time at 256 / 64 / 24
    fake, the basic one 89.8 % / 91.8 % / 90.0 %. A lower bound below 0 is reported as 0.
    """
    return _bootstrap(real, fake, rounds=rounds, confidence=confidence, seed=seed, metrics=metrics)[1]


def kid_with_interval(
    real: torch.Tensor, fake: torch.Tensor, *, rounds: int = 200, confidence: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """KID of two feature sets (``kid_mean``, on the whole fake set) with its bootstrap interval
    (``kid_ci_low``, ``kid_ci_high``): unbiased at any sample count, unlike FID."""
    estimate, interval = _bootstrap(real, fake, rounds=rounds, confidence=confidence, seed=seed, metrics=("kid",))
    return {"kid_mean": estimate["kid"], **interval}


def _bootstrap(
    real: torch.Tensor, fake: torch.Tensor, *, rounds: int, confidence: float, seed: int, metrics: tuple[str, ...]
) -> tuple[dict[str, float], dict[str, float]]:
    """(the estimates, their intervals) of ``bootstrap_intervals``."""
    rng = np.random.default_rng(seed)
    real_np, fake_np = real.double().numpy(), fake.double().numpy()
    kernel_real = real_np[rng.choice(len(real_np), min(len(real_np), KID_REAL), replace=False)]
    kernels = _kid_kernels(kernel_real, fake_np)
    estimate = {}
    if "fid" in metrics:
        estimate["fid"] = fid_of_features(real_np, fake_np)
    if "kid" in metrics:
        estimate["kid"] = kid_of_features(kernel_real, fake_np)
    rounds_of: dict[str, list[float]] = {name: [] for name in estimate}
    for _ in range(rounds):
        picked_fake = rng.integers(0, len(fake_np), len(fake_np))
        picked_real = rng.integers(0, len(real_np), len(real_np))
        if "fid" in estimate:
            rounds_of["fid"].append(fid_of_features(real_np[picked_real], fake_np[picked_fake]))
        c_r = np.bincount(rng.integers(0, len(kernel_real), len(kernel_real)), minlength=len(kernel_real))
        c_f = np.bincount(picked_fake, minlength=len(fake_np))
        if "kid" in estimate:
            rounds_of["kid"].append(_weighted_mmd2(*kernels, c_r.astype(float), c_f.astype(float)))
    tail = (1 - confidence) / 2 * 100
    out = {}
    for name, values in rounds_of.items() if rounds else ():  # (no rounds: no intervals)
        # A round that drew one distinct image of a tiny set has no KID: it is left out, since a
        # NaN percentile would be reported as the interval [0, 0].
        defined = [v for v in values if np.isfinite(v)]
        if not defined:
            continue
        low_q, high_q = np.percentile(defined, [tail, 100 - tail])
        if name == "fid":  # basic: reflected around the estimate
            low_q, high_q = 2 * estimate[name] - high_q, 2 * estimate[name] - low_q
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = max(0.0, low_q), max(0.0, high_q)
    return estimate, out


@dataclass
class Reference:
    """Real images to compare with, their conditions, and the name their features are cached by."""

    images: torch.Tensor  # uint8 [N, 3, H, W]
    cond: torch.Tensor  # condition index per image
    extractor: Extractor
    cache_name: str
    cache_dir: Path

    @classmethod
    def of(
        cls,
        images: torch.Tensor,
        cond: torch.Tensor,
        extractor: Extractor,
        *,
        data_version: str,
        split: str,
        cache_dir: Path,
    ) -> Reference:
        return cls(images, cond, extractor, reference_name(data_version, split, extractor), Path(cache_dir))

    def draw(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` of the reference's images, by index, drawn with replacement."""
        return torch.randint(len(self.cond), (n,), generator=torch.Generator().manual_seed(seed))

    def conditions(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` condition indices drawn from the reference's own (so FID compares like with like)."""
        return self.cond[self.draw(n, seed)]

    def score(self, fake: torch.Tensor, full: bool = True, **intervals: Any) -> dict[str, float]:
        """FID and KID; ``full`` adds precision/recall and, where the extractor classifies, IS;
        ``intervals``: ``bootstrap``, ``confidence``, ``seed`` of ``sample_metrics``."""
        return sample_metrics(
            self.images,
            fake,
            self.extractor,
            reference=self.cache_name,
            cache_dir=self.cache_dir,
            prc=full,
            isc=full and self.extractor.has_logits,
            **intervals,
        )

    def features(self, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's and ``fake``'s FID features (``feature_sets``)."""
        return feature_sets(self.images, fake, self.extractor, reference=self.cache_name, cache_dir=self.cache_dir)


def psnr_ssim(original: torch.Tensor, reconstruction: torch.Tensor) -> dict[str, float]:
    """On [0, 1] images: ``psnr`` is the mean of per-image PSNR (as the paper reports it),
    ``psnr_pooled`` the PSNR of the set's mean squared error; SSIM averaged over the set."""
    a, b = original.float() / 255, reconstruction.float() / 255
    per_image = peak_signal_noise_ratio(b, a, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return {
        "psnr": float(per_image.clamp(max=100).mean()),  # (a perfect image would be infinite)
        "psnr_pooled": float(peak_signal_noise_ratio(b, a, data_range=1.0)),
        "ssim": float(structural_similarity_index_measure(b, a, data_range=1.0)),
    }


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Share of codebook entries used, and the perplexity of their distribution."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codebook_usage": float((counts > 0).float().mean()), "codebook_perplexity": float(entropy.exp())}
