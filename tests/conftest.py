"""Shared fixtures: one Prefect API server per test session, throwaway git+DVC projects, and the
helpers and smoke settings that several test modules use (test modules never import each other).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import mlflow
import pytest
from PIL import Image

import flows  # noqa: F401  (Prefect defaults for this machine)
from components.params import Params
from components.presets import load_params

REPO = Path(__file__).resolve().parents[1]


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def pytest_configure(config: pytest.Config) -> None:
    """Test processes in parallel (pytest-xdist's ``-n``, set in pyproject.toml) share the cores:
    each gets its share of threads, set here in the controller, before the workers start, so they
    and every process they start inherit it. Without it two workers run 2-thread torch and BLAS
    on 2 cores and compute-bound tests ran 3-4 x slower than alone (measured: the FID∞ coverage
    simulation 24 s alone, 76 s beside another worker)."""
    workers = getattr(config.option, "numprocesses", None)
    if isinstance(workers, int) and workers > 1 and "PYTEST_XDIST_WORKER" not in os.environ:
        share = str(max(1, (os.cpu_count() or 1) // workers))
        for variable in THREAD_VARIABLES:
            os.environ.setdefault(variable, share)


@pytest.fixture(scope="session", autouse=True)
def prefect_api():
    """One real Prefect API for the whole session; CLI subprocesses reach it by URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
        yield PREFECT_API_URL.value()
        del os.environ["PREFECT_API_URL"]


@pytest.fixture(scope="session")
def empty_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git+DVC repository with one commit, made once per test process: each test's
    ``project`` is a copy of it (``dvc init`` is a Python process of its own, ~1.3 s a test)."""
    root = tmp_path_factory.mktemp("template") / "project"
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
    return root


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_project: Path) -> Iterator[Path]:
    """An empty git+DVC repository as the working directory, MLflow on its default store."""
    root = tmp_path / "project"
    shutil.copytree(empty_project, root, symlinks=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(root)
    # The default store of this project, for the test's own queries (and its subprocesses).
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    yield root
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, made once per test process: creating one runs MLflow's
    schema migrations (1.7 CPU-seconds, measured), opening a copy takes 0.04."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_store: Path) -> Iterator[str]:
    """A fresh SQLite MLflow store under ``tmp_path`` with one active experiment, for this test
    only (no Prefect, no project); yields the experiment id."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
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


@contextmanager
def _mlflow_server(backend: Path, artifacts: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """A real ``mlflow server`` (SQLite ``backend``, ``artifacts`` destination) on a free loopback
    port; yields its URI once /health answers, stops it afterwards. Lean, as a test needs it: one
    worker and no job runner (by default MLflow starts 4 workers, a job runner and 7 huey
    consumers, ~29 CPU-seconds to start against ~6, measured; the jobs serve GenAI features
    this project never uses)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        + ["--backend-store-uri", f"sqlite:///{backend}", "--artifacts-destination", artifacts],
        env={**os.environ, **(env or {}), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:  # /health with a short timeout: MLflow's client would back off for a minute
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=1):
                    break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server_at() -> Callable[..., AbstractContextManager[str]]:
    """``with mlflow_server_at(backend, artifacts, env) as uri``: a real ``mlflow server`` on loopback."""
    return _mlflow_server


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
