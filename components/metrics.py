"""Image-quality metrics: PSNR/SSIM (torchmetrics), FID/KID (torch-fidelity), codebook use."""

from __future__ import annotations

from pathlib import Path

import torch
import torch_fidelity
from torch.utils.data import Dataset
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from components.features import EXTRACTOR


class _Images(Dataset):
    """uint8 [N, 3, H, W] as the per-image dataset torch-fidelity reads."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def fid_kid(real: torch.Tensor, fake: torch.Tensor, weights: Path, extractor: str = EXTRACTOR) -> dict[str, float]:
    """FID and KID between two uint8 image sets, on the given extractor's features."""
    subset = min(1000, len(real), len(fake))
    result = torch_fidelity.calculate_metrics(
        input1=_Images(fake),
        input2=_Images(real),
        fid=True,
        kid=True,
        kid_subset_size=subset,
        feature_extractor=extractor,
        feature_extractor_weights_path=str(weights),
        cuda=torch.cuda.is_available(),
        cache=False,
        save_cpu_ram=True,  # no loader worker processes for in-memory tensors
        verbose=False,
        batch_size=64,
    )
    return {
        "fid": float(result["frechet_inception_distance"]),
        "kid_mean": float(result["kernel_inception_distance_mean"]),
        "kid_std": float(result["kernel_inception_distance_std"]),
    }


def psnr_ssim(original: torch.Tensor, reconstruction: torch.Tensor) -> dict[str, float]:
    """On [0, 1] images, averaged over the set."""
    a, b = original.float() / 255, reconstruction.float() / 255
    return {
        "psnr": float(peak_signal_noise_ratio(b, a, data_range=1.0)),
        "ssim": float(structural_similarity_index_measure(b, a, data_range=1.0)),
    }


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Share of codebook entries used, and the perplexity of their distribution."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codebook_usage": float((counts > 0).float().mean()), "codebook_perplexity": float(entropy.exp())}
