"""Sample metrics prove themselves: FID against an independent formula, FID against known
disturbances (Heusel et al. 2017, Fig. 1-3), the reference cache, the Inception path offline.

Real images: OpenMoji emoji rendered offline at 64 px, the default data's resolution (the domain
extractor trains and scores at the images' own resolution), split three ways by a name hash
(extractor training / val / a disjoint holdout of the same distribution).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import urllib.error
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from safetensors.torch import load_file, save_file
from torch_fidelity.utils import create_feature_extractor
from torchvision.transforms.v2 import functional as TF

from components import metrics as metrics_module
from components.dataset import to_square_rgb
from components.errors import UserError
from components.features import (
    DOWNLOAD_TAG,
    EXTRACTOR,
    INCEPTION_ENV,
    CNNFeatureExtractor,
    Extractor,
    SmallCNN,
    balanced_accuracy,
    extractor_from_file,
    held_out_scores,
    inception_extractor,
    inception_skeleton,
    majority_rate,
    train_domain_extractor,
)
from components.metrics import _Images, kid_with_interval, reference_name, sample_metrics
from components.sources import limit_per_class, openmoji_items

SIZE = 64  # params/default.yaml data.resolution


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread for torch and for numpy's BLAS: this module's small batches and 128-d
    FID/KID matrices gain little from two, and on a shared 2-core machine two threads spin against
    other processes (measured under load: torch 3x slower; OpenBLAS made the class-collapse test's
    KID kernels and FID eigenvalues 17x slower, 57 s against 3.4 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits  # scikit-learn's, in constraints.txt
    except ImportError:  # pragma: no cover
        blas = contextlib.nullcontext()
    else:
        blas = threadpool_limits(1, user_api="blas")
    with blas:
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def emoji() -> dict[str, torch.Tensor]:
    """~850 emoji: train (half), val and holdout (a quarter each), with group labels."""
    items = limit_per_class(openmoji_items(SIZE), 90)
    classes = sorted({item.label for item in items})
    parts: dict[str, list] = {"train": [], "val": [], "holdout": []}
    for item in items:
        bucket = int(hashlib.sha256(item.name.encode()).hexdigest(), 16) % 4
        split = "train" if bucket < 2 else ("val" if bucket == 2 else "holdout")
        parts[split].append(item)
    out: dict[str, torch.Tensor] = {}
    for split, chosen in parts.items():
        pixels = np.stack([np.asarray(to_square_rgb(item.load(), SIZE)) for item in chosen])
        out[split] = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
        out[f"{split}_labels"] = torch.tensor([classes.index(item.label) for item in chosen])
    out["classes"] = torch.tensor(len(classes))
    return out


@pytest.fixture(scope="module")
def domain(emoji, tmp_path_factory) -> tuple[Extractor, list[tuple[int, dict[str, float]]]]:
    """A domain extractor trained once for the module, and its training log."""
    log: list[tuple[int, dict[str, float]]] = []
    state = train_domain_extractor(
        emoji["train"], emoji["train_labels"], int(emoji["classes"]), steps=200, log=lambda s, m: log.append((s, m))
    )
    path = tmp_path_factory.mktemp("extractor") / "domain.safetensors"
    save_file(state, path)
    return extractor_from_file(path), log


def noise_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --- FID is the Fréchet distance, computed independently -----------------------------------------


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Heusel et al. eq. (6) with scipy's matrix square root (torch-fidelity uses eigenvalues)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("fake_kind", ["holdout", "blurred"])
def test_fid_equals_independent_frechet_distance(emoji, domain, fake_kind):
    extractor, _ = domain
    real = emoji["val"]
    fake = emoji["holdout"] if fake_kind == "holdout" else TF.gaussian_blur(emoji["holdout"], [5, 5], [1.5, 1.5])
    net = CNNFeatureExtractor(EXTRACTOR, ["pool"], feature_extractor_weights_path=extractor.weights_path).eval()
    with torch.no_grad():
        features = [net(images)[0].double().numpy() for images in (real, fake)]
    assert features[0].shape[0] > features[0].shape[1]  # more samples than dimensions: full-rank covariances
    expected = frechet_distance(*features)
    fid = sample_metrics(real, fake, extractor, prc=False)["fid"]
    assert fid == pytest.approx(expected, rel=1e-4)


# --- the domain extractor behaves like Inception FID under disturbances ---------------------------


def _gaussian_noise(x: torch.Tensor, level: float) -> torch.Tensor:
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    return (x.float() + level * z).clamp(0, 255).round().to(torch.uint8)


def _blur(x: torch.Tensor, level: float) -> torch.Tensor:
    if level == 0:
        return x
    k = 2 * math.ceil(3 * level) + 1
    return TF.gaussian_blur(x, [k, k], [level, level])


def _salt_and_pepper(x: torch.Tensor, level: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    hit = torch.rand(x.shape[0], 1, *x.shape[2:], generator=g)  # the same draw at every level: nested sets
    salt = torch.rand(hit.shape, generator=g) < 0.5
    out = x.clone()
    out = torch.where((hit < level) & salt, torch.tensor(255, dtype=torch.uint8), out)
    return torch.where((hit < level) & ~salt, torch.tensor(0, dtype=torch.uint8), out)


def _black_rectangles(x: torch.Tensor, level: float) -> torch.Tensor:
    """Five rectangles per image at fixed random centres, side = level x image side."""
    g = torch.Generator().manual_seed(3)
    size = x.shape[-1]
    centres = torch.randint(0, size, (x.shape[0], 5, 2), generator=g)
    half = round(level * size / 2)
    out = x.clone()
    for i in range(x.shape[0]):
        for cy, cx in centres[i].tolist():
            out[i, :, max(0, cy - half) : cy + half, max(0, cx - half) : cx + half] = 0
    return out


def _swirl(x: torch.Tensor, level: float) -> torch.Tensor:
    """skimage-style swirl: rotation angle = level * exp(-r / radius) around the centre."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, x.shape[-2]), torch.linspace(-1, 1, x.shape[-1]), indexing="ij")
    r, theta = torch.sqrt(xs**2 + ys**2), torch.atan2(ys, xs)
    theta = theta + level * torch.exp(-r / 0.5)
    grid = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], -1).expand(x.shape[0], -1, -1, -1)
    out = torch.nn.functional.grid_sample(x.float(), grid, padding_mode="border", align_corners=True)
    return out.round().clamp(0, 255).to(torch.uint8)


DISTURBANCES = {
    "gaussian_noise": (_gaussian_noise, [16, 32, 64, 128]),
    "gaussian_blur": (_blur, [1.0, 1.5, 2.0, 3.0]),
    "salt_and_pepper": (_salt_and_pepper, [0.02, 0.06, 0.15, 0.3]),
    "black_rectangles": (_black_rectangles, [0.1, 0.2, 0.3, 0.45]),
    "swirl": (_swirl, [1, 2, 4, 8]),
}


@pytest.fixture(scope="module")
def clean_fid(emoji, domain) -> float:
    """Level 0 of every disturbance: val against the undisturbed holdout."""
    return sample_metrics(emoji["val"], emoji["holdout"], domain[0], prc=False)["fid"]


@pytest.mark.parametrize("kind", DISTURBANCES)
def test_domain_fid_rises_with_disturbance_level(emoji, domain, clean_fid, kind):
    """Clean val against the holdout undisturbed and disturbed at four rising levels."""
    extractor, _ = domain
    disturb, levels = DISTURBANCES[kind]
    fids = [clean_fid]
    fids += [sample_metrics(emoji["val"], disturb(emoji["holdout"], lv), extractor, prc=False)["fid"] for lv in levels]
    assert all(a < b for a, b in zip(fids, fids[1:], strict=False)), dict(zip([0, *levels], fids, strict=True))


def test_same_distribution_scores_far_below_noise(emoji, domain):
    extractor, _ = domain
    val, holdout = emoji["val"], emoji["holdout"]
    same = sample_metrics(val, holdout, extractor)
    noise = sample_metrics(val, noise_images(len(holdout)), extractor)
    assert same["fid"] * 5 < noise["fid"]
    assert same["kid_mean"] * 20 < noise["kid_mean"]
    for metrics in (same, noise):
        assert metrics["kid_std"] >= 0
        assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert same["precision"] > 0.8 and same["recall"] > 0.8  # a disjoint sample lies on the real manifold
    assert noise["recall"] < 0.05  # noise covers none of it
    # Noise features cluster tightly, so one real outlier's wide k-NN ball can hold many of them
    # (the known outlier weakness of k-NN precision): lower than the real sample's, not zero.
    assert noise["precision"] < same["precision"]


def test_inception_score_needs_logits(emoji, domain, tmp_path):
    """IS comes from the classifier head; weights without one give no IS rather than a wrong one."""
    extractor, _ = domain
    fake = emoji["holdout"][:40]
    scored = sample_metrics(emoji["val"][:40], fake, extractor, prc=False, isc=True)
    assert 1 <= scored["isc_mean"] <= int(emoji["classes"]) and scored["isc_std"] >= 0
    headless = tmp_path / "headless.safetensors"
    save_file({k: v for k, v in load_file(extractor.weights_path).items() if not k.startswith("head.")}, headless)
    plain = extractor_from_file(headless)
    assert not plain.has_logits
    assert "isc_mean" not in sample_metrics(emoji["val"][:40], fake, plain, prc=False, isc=True)


def test_small_sets_work_down_to_two_images(emoji, domain):
    extractor, _ = domain
    for n in (2, 3, 4):
        metrics = sample_metrics(emoji["val"][:n], emoji["holdout"][:n], extractor)
        assert all(math.isfinite(v) for v in metrics.values()), (n, metrics)
    with pytest.raises(UserError, match="at least 2"):
        sample_metrics(emoji["val"][:1], emoji["holdout"][:5], extractor)


# --- the reference cache -----------------------------------------------------------------------


def test_reference_features_are_cached_and_reused(emoji, domain, tmp_path, monkeypatch):
    extractor, _ = domain
    seen: list[int] = []
    forward = CNNFeatureExtractor.forward
    monkeypatch.setattr(CNNFeatureExtractor, "forward", lambda self, x: (seen.append(len(x)), forward(self, x))[1])
    name = reference_name("abc123", "val", extractor)
    assert extractor.cache_key in name and "/" not in name
    val, holdout = emoji["val"], emoji["holdout"]

    first = sample_metrics(val, holdout, extractor, reference=name, cache_dir=tmp_path)
    assert sum(seen) == len(val) + len(holdout)
    seen.clear()
    # Different real images under the same name: the cached val features are used, ``real`` is not read.
    second = sample_metrics(noise_images(len(val)), holdout, extractor, reference=name, cache_dir=tmp_path)
    assert sum(seen) == len(holdout)
    assert second == first
    # Without the reference the same call does look at the noise.
    assert sample_metrics(noise_images(len(val)), holdout, extractor)["fid"] > 5 * first["fid"]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files and all(f.startswith(f"{name}-{EXTRACTOR}-") for f in files)  # the fake set is never cached


def test_metrics_are_torch_fidelitys_own_and_its_unpickling_cache_is_never_read(emoji, domain, tmp_path):
    """The numbers are calculate_metrics' to the last digit; the reference cache is safetensors,
    so a pickle planted where torch-fidelity's cache would be never runs, and a damaged cache
    file is computed again."""
    extractor, _ = domain
    real, fake = emoji["val"][:40], emoji["holdout"][:40]
    ours = sample_metrics(real, fake, extractor, isc=True)
    theirs = torch_fidelity.calculate_metrics(
        input1=_Images(fake),
        input2=_Images(real),
        feature_extractor=extractor.fidelity_name,
        feature_extractor_weights_path=extractor.weights_path,
        **dict(fid=True, kid=True, prc=True, isc=True, kid_subset_size=40, prc_neighborhood=3, isc_splits=10),
        **dict(save_cpu_ram=True, verbose=False, batch_size=64, cuda=False),
    )
    names = {"fid": "frechet_inception_distance", "kid_mean": "kernel_inception_distance_mean"}
    names |= {"kid_std": "kernel_inception_distance_std", "precision": "precision", "recall": "recall"}
    names |= {"isc_mean": "inception_score_mean", "isc_std": "inception_score_std"}
    assert ours == {ours_name: pytest.approx(float(theirs[name]), rel=1e-9) for ours_name, name in names.items()}

    name = reference_name("abc123", "val", extractor)
    torch.save({"pool": _Planted()}, tmp_path / f"{name}-{EXTRACTOR}-features-pool.pt")  # torch-fidelity's name
    damaged = tmp_path / f"{name}-{EXTRACTOR}-pool.safetensors"
    damaged.write_bytes(b"half a file")
    cached = sample_metrics(real, fake, extractor, reference=name, cache_dir=tmp_path)
    assert not PLANTED_RAN and cached["fid"] == pytest.approx(ours["fid"], rel=1e-9)
    assert load_file(damaged)["pool"].shape == (40, 128)  # written again, whole


# --- the standard Inception extractor, offline -------------------------------------------------

PLANTED_RAN: list[str] = []


def _planted_payload(message: str) -> str:
    PLANTED_RAN.append(message)
    return message


class _Planted:
    """Pickles to a call of ``_planted_payload``: what weights_only=True must refuse to run."""

    def __reduce__(self):
        return (_planted_payload, ("ran",))


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    """torch-fidelity's own Inception network, randomly initialised: the real file's keys and shapes."""
    path = tmp_path_factory.mktemp("inception") / "inception-random.pt"
    torch.manual_seed(0)
    torch.save(inception_skeleton().state_dict(), path)
    return path


def test_inception_with_local_weights_runs_end_to_end(inception_weights):
    extractor = inception_extractor(inception_weights)
    assert extractor.weights_path == str(inception_weights) and extractor.has_logits
    assert extractor.tag.startswith("inception-v3-compat:") and len(extractor.tag.split(":")[1]) == 12
    real, fake = noise_images(3, seed=1), noise_images(3, seed=2)
    metrics = sample_metrics(real, fake, extractor, isc=True)
    assert set(metrics) == {"fid", "kid_mean", "kid_std", "precision", "recall", "isc_mean", "isc_std"}
    assert all(math.isfinite(v) for v in metrics.values())


def test_inception_weights_changed_after_the_check_are_never_unpickled(inception_weights, tmp_path, monkeypatch):
    """Checked, then swapped for a pickle before the network loads them (the check-then-load race):
    the network loads tensors only, so the pickle does not run."""
    weights = tmp_path / "inception.pt"
    weights.write_bytes(inception_weights.read_bytes())
    extractor = inception_extractor(weights)  # checked here

    def swap_then_create(*args, **kwargs):
        torch.save({"fc.weight": _Planted()}, weights)
        return create_feature_extractor(*args, **kwargs)

    monkeypatch.setattr(metrics_module, "create_feature_extractor", swap_then_create)
    with pytest.raises(UserError, match="not a plain PyTorch state dict"):
        sample_metrics(noise_images(3, seed=1), noise_images(3, seed=2), extractor)
    assert not PLANTED_RAN


def test_inception_weights_from_env_var(inception_weights, monkeypatch):
    monkeypatch.setenv(INCEPTION_ENV, str(inception_weights))
    assert inception_extractor() == inception_extractor(inception_weights)
    monkeypatch.delenv(INCEPTION_ENV)
    download = inception_extractor()
    assert download.weights_path is None and download.tag == DOWNLOAD_TAG


def test_missing_or_unsafe_inception_weights_are_user_errors(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(UserError, match="nowhere.pt"):
        inception_extractor(missing)
    monkeypatch.setenv(INCEPTION_ENV, str(missing))
    with pytest.raises(UserError, match=INCEPTION_ENV):
        inception_extractor()
    planted = tmp_path / "planted.pt"
    torch.save({"fc.weight": _Planted()}, planted)
    with pytest.raises(UserError, match="not a plain"):
        inception_extractor(planted)
    assert not PLANTED_RAN
    wrong = tmp_path / "wrong.pt"
    torch.save({"fc.weight": torch.zeros(3)}, wrong)
    with pytest.raises(UserError, match="does not fit"):
        inception_extractor(wrong)


def test_inception_download_failure_is_a_user_error(monkeypatch):
    def offline(*_, **__):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", offline)
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    with pytest.raises(UserError, match="local weights file"):
        sample_metrics(noise_images(4, seed=1), noise_images(4, seed=2), inception_extractor())


# --- the domain extractor's training ------------------------------------------------------------


def test_domain_extractor_learns(domain, emoji):
    extractor, log = domain
    classes = int(emoji["classes"])
    assert [step for step, _ in log] == list(range(25, 201, 25))
    assert log[-1][1]["extractor_acc"] > 3 / classes  # class-balanced batches: chance is 1 / classes
    assert log[-1][1]["extractor_loss"] < log[0][1]["extractor_loss"]
    assert extractor.has_logits and extractor.tag.startswith(f"{EXTRACTOR}:")
    # On held-out images at the resolution it trained at: per-class recall well above chance,
    # and top-1 above what always answering the most common class would score.
    scores = held_out_scores(load_file(extractor.weights_path), emoji["val"], emoji["val_labels"])
    assert scores["balanced_accuracy"] > 3 / classes, scores
    assert scores["accuracy"] > 2 * scores["majority_rate"], scores


def test_domain_extractor_trains_on_whole_images(emoji, monkeypatch):
    """Training batches have the images' own size: the network learns content at the pixel
    scale FID later scores whole images at (no down-cropping)."""
    seen: set[tuple[int, ...]] = set()
    forward = SmallCNN.forward
    monkeypatch.setattr(SmallCNN, "forward", lambda self, x: (seen.add(tuple(x.shape[1:])), forward(self, x))[1])
    images, labels = emoji["train"][:64], emoji["train_labels"][:64]
    train_domain_extractor(images, labels, int(emoji["classes"]), steps=2, batch_size=16)
    assert seen == {(3, SIZE, SIZE)}


def test_balanced_accuracy_on_a_known_case():
    """Recalls 2/3, 1/1 and 1/2 over the classes present (class 3 is only ever predicted, -1 is
    no class): balanced accuracy 13/18, top-1 4/7, majority rate 3/7."""
    labels = torch.tensor([0, 0, 0, 1, 2, 2, -1])
    predicted = torch.tensor([0, 0, 3, 1, 2, 0, 1])
    assert balanced_accuracy(predicted, labels) == pytest.approx(13 / 18)
    assert majority_rate(labels) == pytest.approx(3 / 7)
    # Always answering the majority class: top-1 = majority rate, balanced = 1 / classes present.
    assert balanced_accuracy(torch.zeros(7, dtype=torch.long), labels) == pytest.approx(1 / 3)
    assert balanced_accuracy(labels.clamp(min=0), labels) == 1.0
    assert balanced_accuracy(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)) == 0.0


def test_domain_extractor_training_is_deterministic(emoji):
    images, labels, classes = emoji["train"][:128], emoji["train_labels"][:128], int(emoji["classes"])
    a = train_domain_extractor(images, labels, classes, seed=5, steps=8, batch_size=16)
    b = train_domain_extractor(images, labels, classes, seed=5, steps=8, batch_size=16)
    c = train_domain_extractor(images, labels, classes, seed=6, steps=8, batch_size=16)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert all(t.is_contiguous() for t in a.values())


def test_domain_fid_rises_as_classes_go_missing(emoji, domain):
    """Class collapse: "generated" sets of 200 holdout images (drawn with replacement, mean of 4
    draws) from only the k most common classes, against val. A network that sees content, not
    just colour statistics, scores each loss of classes worse.

    The issue's "10, 5, 2, 1" starts from every class: its "10" counted OpenMoji's 10 Unicode
    groups, and its 10-class FID (0.13) was the same-distribution floor. These emoji have 11
    classes, the 10 groups plus OpenMoji's extras, so k = all 11, 5, 2, 1. Dropping a single
    class is not a step this test can see: measured at 64 px over 8 draws, keeping the 10 most
    common classes gave 1.09 and the 10 Unicode groups 1.01, against 1.19 for all 11 (+-0.2)."""
    extractor, _ = domain
    labels = emoji["holdout_labels"]
    by_size = torch.bincount(labels).argsort(descending=True, stable=True)
    fids = {}
    for keep in (int(emoji["classes"]), 5, 2, 1):
        pool = torch.nonzero(torch.isin(labels, by_size[:keep])).squeeze(1)
        draws = [pool[torch.randint(len(pool), (200,), generator=torch.Generator().manual_seed(d))] for d in range(4)]
        fids[keep] = (
            sum(sample_metrics(emoji["val"], emoji["holdout"][p], extractor, prc=False)["fid"] for p in draws) / 4
        )
    values = list(fids.values())
    assert all(a < b for a, b in zip(values, values[1:], strict=False)), fids


def test_a_resample_of_one_distinct_image_leaves_the_kid_interval_honest():
    """Two real images: about half the bootstrap's resamples repeat one image, which has no pair
    of distinct images and so no KID. Such a round once made the percentile NaN, reported as
    [0, 0]: certainty where there is least. It is left out; the interval spans the other rounds."""
    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.normal(size=(2, 16)))
    fake = torch.from_numpy(rng.normal(size=(6, 16)) + 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 0/0 on the way
        out = kid_with_interval(real, fake, rounds=200, seed=0)
    assert np.isfinite([out["kid_ci_low"], out["kid_ci_high"]]).all()
    assert out["kid_ci_high"] > out["kid_ci_low"]
