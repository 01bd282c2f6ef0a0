"""Feature extractors for FID-type metrics, and the record of which one produced a number.

Two extractors, both run through torch-fidelity:

- ``inception-v3-compat``: torch-fidelity's port of the TF Inception-v3 that FID was defined
  with. Numbers comparable with the literature, but its weights cannot be downloaded offline;
  give a local file (argument or ``LATENTLAB_INCEPTION_WEIGHTS``).
- ``latentlab-cnn``: a small convolutional network that works offline at any resolution. Trained
  on a dataset's labels (``train_domain_extractor``) it gives a domain FID that responds to
  disturbances the way Inception FID does. It is comparable only with itself, so every metric
  records ``Extractor.tag``: the network and a hash of its weights.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch_fidelity
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torchvision.transforms import v2

from components.errors import UserError
from components.images import to_float
from components.progress import track

EXTRACTOR = "latentlab-cnn"
INCEPTION = "inception-v3-compat"
INCEPTION_ENV = "LATENTLAB_INCEPTION_WEIGHTS"
DOWNLOAD_TAG = f"{INCEPTION}:torch-fidelity-download"
FEATURE_DIM = 128
SCALE_JITTER = (0.7, 1.0)  # random resized crop: 70-100 % of the area, resized back to the full size


@dataclass(frozen=True)
class Extractor:
    """A torch-fidelity feature extractor and the weights it runs with.

    ``tag`` goes into the MLflow tag ``latentlab.fid_extractor``; ``weights_path`` None means
    torch-fidelity downloads its own weights (online only).
    """

    name: str
    weights_path: str | None
    tag: str
    has_logits: bool

    @property
    def fidelity_name(self) -> str:
        """The name torch-fidelity knows its network by: a local Inception file loads as tensors only."""
        return SAFE_INCEPTION if self.name == INCEPTION and self.weights_path is not None else self.name

    @property
    def cache_key(self) -> str:
        """Filesystem-safe name + weights hash, for reference-statistics cache names."""
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in self.tag)


# --- latentlab-cnn -----------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Four strided conv blocks and global pooling: features for any input size >= 16 px.

    ``head`` (a linear classifier on the pooled features) exists only in trained extractors.
    """

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
        if "logits" in features_list and not classes:
            raise ValueError(f"{EXTRACTOR} weights without a classifier head provide no logits")
        self.net = SmallCNN(classes)
        self.net.load_state_dict(state)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("pool", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "logits" if metric == "isc" else "pool"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 64, 64, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pool = self.net(to_float(x))
        features = {"pool": pool}
        if "logits" in self.features_list:
            features["logits"] = self.net.head(pool)
        return tuple(features[name] for name in self.features_list)


torch_fidelity.register_feature_extractor(EXTRACTOR, CNNFeatureExtractor)


def weights_hash(path: Path) -> str:
    """First 12 hex digits of the file's sha256: which weights, in a tag short enough to read."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def extractor_from_file(path: str | Path) -> Extractor:
    """A ``latentlab-cnn`` weights file (safetensors) as an Extractor."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Feature extractor weights not found: {path}. Train the domain extractor again.")
    has_logits = "head.weight" in load_file(path)
    return Extractor(EXTRACTOR, str(path), f"{EXTRACTOR}:{weights_hash(path)}", has_logits)


@contextmanager
def bit_reproducible() -> Iterator[None]:
    """One thread and deterministic algorithms inside the block: a multi-threaded CPU reduction
    sums in an order that varies from run to run, and so do the trained weights' last bits."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def train_domain_extractor(
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: int,
    *,
    seed: int = 0,
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 2e-3,
    log: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Train SmallCNN(classes) to classify ``images`` (uint8 [N, 3, H, W]); its state dict.

    Why a classifier: features that separate the dataset's classes are what make FID see
    content, not just colour statistics (Heusel et al. used an ImageNet classifier).

    - Batches are class-balanced, so a majority class cannot pass for learning (training chance =
      1/classes; on imbalanced val compare ``held_out_scores``' balanced accuracy with 1/classes).
    - Training sees whole images at their own resolution, the resolution FID later scores them
      at: random resized crops of 70-100 % of the area (aspect 0.9-1.1) resized back to the full
      size, flips and mild colour jitter. 600 steps of 64 take about a minute on two CPU cores for
      64-px data (benchmarks/extractor.py); 32-px crops of 64-px images trained 3.5x faster but the
      network then scored content at a scale it never saw.
    - Augmentation parameters are drawn per group of 8 images (torchvision v2 transforms share
      them across a batch tensor); per-image draws cost as much as the training step.
    - Deterministic for a seed on CPU: all randomness comes from the seeded global generator, forked
      so the caller's random state is left as it was, and training runs single-threaded with
      deterministic kernels (``bit_reproducible``), so one data version gives one extractor (one
      weights hash, one FID scale) on every run and every machine of the same CPU kind.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 [N, 3, H, W] images, got {images.dtype} {tuple(images.shape)}")
    augment = v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomResizedCrop(tuple(images.shape[-2:]), scale=SCALE_JITTER, ratio=(0.9, 1.1), antialias=True),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        ]
    )
    counts = torch.bincount(labels, minlength=classes).clamp(min=1).float()
    weights = (1.0 / counts)[labels]
    with torch.random.fork_rng(devices=[]), bit_reproducible():
        torch.manual_seed(seed)
        net = SmallCNN(classes)
        optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
        net.train()
        window_loss, window_right, window_seen = 0.0, 0, 0
        for step in track(range(1, steps + 1), "domain extractor"):
            index = torch.multinomial(weights, batch_size, replacement=True)
            batch = torch.cat([augment(group) for group in images[index].split(8)])
            target = labels[index]
            logits = net.head(net(to_float(batch)))
            loss = F.cross_entropy(logits, target, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            window_loss += loss.item() * len(target)
            window_right += int((logits.argmax(1) == target).sum())
            window_seen += len(target)
            if log is not None and (step % 25 == 0 or step == steps):
                log(step, {"extractor_loss": window_loss / window_seen, "extractor_acc": window_right / window_seen})
                window_loss, window_right, window_seen = 0.0, 0, 0
    net.eval()
    return {name: tensor.detach().clone().contiguous() for name, tensor in net.state_dict().items()}


@torch.no_grad()
def classify(state: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """A trained extractor's top-1 class for each image (uint8 [N, 3, H, W]), at the images' size."""
    net = SmallCNN(state["head.weight"].shape[0])
    net.load_state_dict(state)
    net.eval()
    return torch.cat(
        [net.head(net(to_float(x))).argmax(1) for x in images.split(256)] or [torch.zeros(0, dtype=torch.long)]
    )


def balanced_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean per-class recall over the classes present in ``labels`` (-1, no class, is left out).

    With imbalanced classes top-1 accuracy rewards the majority class (one OpenMoji group is
    over half of val); a classifier that always answers it scores 1 / (classes present) here.
    """
    present = labels[labels >= 0].unique()
    if not len(present):
        return 0.0
    recalls = [(predicted[labels == c] == c).float().mean() for c in present]
    return float(torch.stack(recalls).mean())


def majority_rate(labels: torch.Tensor) -> float:
    """Share of the most common class: the top-1 accuracy of always answering it."""
    known = labels[labels >= 0]
    return int(torch.bincount(known).max()) / len(labels) if len(known) else 0.0


def held_out_scores(state: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """A trained extractor's classifier on images it did not train on: top-1 accuracy, balanced
    accuracy and the majority-class rate that top-1 accuracy must beat to mean anything."""
    predicted = classify(state, images)
    return {
        "accuracy": int((predicted == labels).sum()) / max(len(labels), 1),
        "balanced_accuracy": balanced_accuracy(predicted, labels),
        "majority_rate": majority_rate(labels),
    }


def held_out_accuracy(state: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of a trained extractor's classifier on images it did not train on."""
    return held_out_scores(state, images, labels)["accuracy"]


# --- inception-v3-compat -----------------------------------------------------------------------


class _InceptionSkeleton(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception modules without its weight loading (for shapes and tests)."""

    def __init__(self, name: str, features_list: list[str], **kwargs):
        kwargs["feature_extractor_weights_path"] = _empty_state()  # torch-fidelity insists on loading one
        super().__init__(name, features_list, **kwargs)

    def load_state_dict(self, *_, **__):  # type: ignore[override]
        return None


def _empty_state() -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save({}, buffer)
    buffer.seek(0)
    return buffer


class _WeightsOnlyInception(_InceptionSkeleton):
    """torch-fidelity's Inception-v3 with its weights loaded as tensors only (``weights_only``).

    torch-fidelity 0.4.0 loads a local weights file with full unpickling: checking the file first
    and letting it load the file again would run whatever was put there in between."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str, **kwargs):
        state = _load_tensors(Path(feature_extractor_weights_path))  # (the file may have changed since its check)
        super().__init__(name, features_list, **kwargs)
        nn.Module.load_state_dict(self, state)


SAFE_INCEPTION = "latentlab-inception-v3-compat"  # torch-fidelity's name for ``_WeightsOnlyInception``
torch_fidelity.register_feature_extractor(SAFE_INCEPTION, _WeightsOnlyInception)


def inception_skeleton(device: str = "cpu") -> nn.Module:
    """torch-fidelity's own Inception-v3 network, randomly initialised, no download.
    ``device="meta"`` builds it instantly, for shapes only."""
    with torch.device(device):
        return _InceptionSkeleton(INCEPTION, ["2048"])


@cache
def _inception_shapes() -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in inception_skeleton("meta").state_dict().items()}


def _load_tensors(path: Path) -> object:
    """What ``path`` holds, loaded with ``weights_only=True``: never anything but tensors and containers."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise UserError(
            f"{path} is not a plain PyTorch state dict of tensors (it was not unpickled: {str(error)[:200]}). "
            f"Use torch-fidelity's weights-inception-2015-12-05-6726825d.pth."
        ) from None


def check_inception_weights(path: Path) -> None:
    """Refuse anything but a plain state dict of Inception-shaped tensors.

    The file is loaded with ``weights_only=True`` and its keys and shapes compared with
    torch-fidelity's network, for a message that names the problem; the extractor loads it again
    the same way (``_WeightsOnlyInception``), never with torch-fidelity's full unpickling.
    """
    state = _load_tensors(path)
    expected = _inception_shapes()
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors; use torch-fidelity's Inception weights file.")
    actual = {name: tuple(t.shape) for name, t in state.items()}
    if actual != expected:
        missing = sorted(set(expected) - set(actual))[:3]
        wrong = sorted(k for k in set(expected) & set(actual) if expected[k] != actual[k])[:3]
        unexpected = sorted(set(actual) - set(expected))[:3]
        raise UserError(
            f"{path} does not fit torch-fidelity's inception-v3-compat network (missing {missing}, "
            f"wrong shape {wrong}, unexpected {unexpected}); use weights-inception-2015-12-05-6726825d.pth."
        )


def inception_extractor(weights: str | Path | None = None) -> Extractor:
    """The standard FID network: from a local file (argument, else $LATENTLAB_INCEPTION_WEIGHTS).

    Without either, torch-fidelity downloads its weights at first use; that works online only.
    """
    location = weights if weights is not None else os.environ.get(INCEPTION_ENV) or None
    if location is None:
        return Extractor(INCEPTION, None, DOWNLOAD_TAG, has_logits=True)
    path = Path(location).expanduser()
    if not path.is_file():
        raise UserError(
            f"Inception weights not found: {path}. Point the path (or ${INCEPTION_ENV}) at a local copy of "
            "torch-fidelity's weights-inception-2015-12-05-6726825d.pth, or use the offline domain extractor."
        )
    check_inception_weights(path)
    return Extractor(INCEPTION, str(path), f"{INCEPTION}:{weights_hash(path)}", has_logits=True)
