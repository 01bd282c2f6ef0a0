"""Feature extractors for FID-type metrics, registered with torch-fidelity.

``latentlab-cnn`` is a small convolutional network that works offline on any resolution. Until
it is trained on a dataset's labels (the evaluation stage's domain extractor), its weights are a
fixed random initialisation: random-feature FID tracks low-level statistics (colour, blur,
texture) and is comparable only with itself. The name recorded with every metric says which
weights produced it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch_fidelity
from safetensors.torch import load_file, save_file
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

EXTRACTOR = "latentlab-cnn"
FEATURE_DIM = 128


class SmallCNN(nn.Module):
    """Four strided conv blocks and global pooling: features for any input size >= 16 px."""

    def __init__(self, classes: int = 0):
        super().__init__()
        widths = (32, 64, 128, FEATURE_DIM)
        layers: list[nn.Module] = []
        channels = 3
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, 2, 1), nn.GroupNorm(8, width), nn.SiLU()]
            channels = width
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(FEATURE_DIM, classes) if classes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class CNNFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity adapter: uint8 images in, ``pool`` features (and ``logits``) out."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **_):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"{EXTRACTOR} needs feature_extractor_weights_path")
        state = load_file(feature_extractor_weights_path)
        classes = state["head.weight"].shape[0] if "head.weight" in state else 0
        self.net = SmallCNN(classes)
        self.net.load_state_dict(state)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("pool",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "pool"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 64, 64, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = x.float() / 127.5 - 1
        return (self.net(x),)


torch_fidelity.register_feature_extractor(EXTRACTOR, CNNFeatureExtractor)


def random_extractor(cache_dir: Path, seed: int = 0) -> tuple[Path, str]:
    """The fixed random-init extractor's weights file and its recorded name (with a hash)."""
    path = Path(cache_dir) / f"{EXTRACTOR}-random-seed{seed}.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        save_file(SmallCNN().state_dict(), path)
        torch.random.set_rng_state(generator_state)
    return path, f"{EXTRACTOR}-random-seed{seed}:{weights_hash(path)}"


def weights_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
