"""Shared fixtures: one Prefect API server per test session, throwaway git+DVC projects, and the
helpers and smoke settings that several test modules use (test modules never import each other).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest
from PIL import Image

import flows  # noqa: F401  (Prefect defaults for this machine)
from components.params import Params
from components.presets import load_params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def prefect_api():
    """One real Prefect API for the whole session; CLI subprocesses reach it by URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
        yield PREFECT_API_URL.value()
        del os.environ["PREFECT_API_URL"]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty git+DVC repository as the working directory, MLflow on its default store."""
    root = tmp_path / "project"
    root.mkdir()
    _git(root, "init", "-q")
    _git(root, "config", "user.email", "test@example.com")
    _git(root, "config", "user.name", "test")
    subprocess.run(
        [sys.executable, "-m", "dvc", "init", "-q"],
        cwd=root,
        check=True,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
    )
    _git(root, "commit", "-q", "-m", "init")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(root)
    # The default store of this project, for the test's own queries (and its subprocesses).
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    yield root
    mlflow.set_tracking_uri(None)


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh SQLite MLflow store under ``tmp_path`` with one active experiment, for this test
    only (no Prefect, no project); yields the experiment id."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = mlflow.create_experiment("latentlab", artifact_location=(tmp_path / "mlartifacts").as_uri())
    # set_experiment changes process-wide state (and the environment): give it back afterwards.
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    mlflow.set_experiment(experiment_id=experiment_id)
    yield experiment_id
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def _latentlab(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed console script, as a user runs it."""
    exe = Path(sys.executable).with_name("latentlab")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def _write_folder(root: Path) -> None:
    """An image folder of two classes with a caption file and every kind of bad file."""
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (200, 10 * i, 0)).save(root / "cats" / f"c{i}.png")
        Image.new("RGB", (40, 48), (0, 10 * i, 200)).save(root / "dogs" / f"d{i}.jpg")
    (root / "captions.csv").write_text("file,caption\ncats/c0.png,a red cat\n")
    (root / "notes.txt").write_text("not an image")
    (root / "cats" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    (root / "dogs" / "empty.png").write_bytes(b"")
    good = root / "cats" / "c0.png"
    (root / "cats" / "truncated.png").write_bytes(good.read_bytes()[:-40])


@pytest.fixture(scope="session")
def repo() -> Path:
    """The root of this repository (its params/, README.md, .ci/)."""
    return REPO


@pytest.fixture(scope="session")
def git() -> Callable[..., str]:
    """``git(root, *args)``: run git in ``root``, return its stdout."""
    return _git


@pytest.fixture(scope="session")
def cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``cli(cwd, *args)``: the installed ``latentlab`` console script, as a user runs it."""
    return _latentlab


@pytest.fixture(scope="session")
def write_folder() -> Callable[[Path], None]:
    """``write_folder(root)``: an image folder with labels, a caption and bad files under ``root``."""
    return _write_folder


@pytest.fixture
def ae_smoke() -> list[str]:
    """``--set`` overrides of params/smoke.yaml for an autoencoder that trains in seconds."""
    return [
        "data.resolution=16",
        "data.max_per_class=6",
        "data.val_fraction=0.3",
        "ae.factor=4",
        "ae.base_channels=8",
        "ae.channel_mult=[1, 1, 2, 2, 2, 2]",
        "ae.batch_size=8",
        "ae.max_steps=6",
        "ae.disc_start=3",
        "ae.log_every=2",
        "ae.image_every=3",
        "ae.checkpoint_every=2",
    ]


@pytest.fixture
def ldm_smoke(ae_smoke: list[str]) -> list[str]:
    """``ae_smoke`` and the overrides for an LDM that trains in seconds on top of it."""
    return [
        *ae_smoke,
        "ldm.widths=[16, 32]",
        "ldm.batch_size=8",
        "ldm.max_steps=6",
        "ldm.log_every=2",
        "ldm.image_every=3",
        "ldm.checkpoint_every=3",
        "ldm.sample_steps=3",
        "ldm.samples_per_class=1",
    ]


@pytest.fixture(scope="session")
def smoke_params(repo: Path) -> Callable[..., Params]:
    """``smoke_params(*overrides)``: params/smoke.yaml with these ``--set`` overrides."""

    def load(*overrides: str) -> Params:
        return load_params(repo / "params/smoke.yaml", list(overrides))

    return load


TINY_EVAL = [
    "eval.samples=16",
    "eval.sample_steps=2",
    "eval.batch_size=16",
    "eval.ddim_steps=[2, 4]",
    "eval.curve_samples=8",
    "eval.extractor_steps=20",
    "ldm.budget_points=2",
    "ldm.budget_samples=8",
    "ldm.budget_sample_steps=2",
]


@pytest.fixture
def tiny_sweep(ldm_smoke: list[str]) -> list[str]:
    """The ``--set`` overrides of a sweep over f in 1, 4 that runs in minutes."""
    return [
        *ldm_smoke,
        *TINY_EVAL,
        "ldm.max_steps=4",  # single runs; the sweep's own budget below
        "sweep.ae_steps=6",
        "sweep.ldm_steps=4",
        "sweep.factors=[1, 4]",
        "sweep.budget=steps",
    ]


@pytest.fixture
def tiny(smoke_params, tiny_sweep):
    """``tiny(*extra)``: the smoke preset with ``tiny_sweep`` and ``extra`` overrides."""

    def load(*extra: str):
        return smoke_params(*tiny_sweep, *extra)

    return load
