"""The Lightning callbacks that report a training run to MLflow: metrics, images/s, sample
grids, FID during training. (Kept apart from ``components.tracking`` so that the command line
can reach the tracking store without importing Lightning, which takes seconds.)"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytorch_lightning as L
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from components.errors import store_failure
from components.params import TrainingBudget
from components.tracking import log_metrics
from components.training import CHECKPOINT, LAST

logger = logging.getLogger("latentlab")


class WhileTheStoreBlips:
    """Runs what a callback reports during training. A tracking server or artifact store that
    does not answer costs reports, not the training: a warning, then no report is tried for a
    minute (each failed attempt blocks for MLflow's own retries). What training ends with
    (totals, the model) is not reported through this: it must land, and the stage's task
    retries it (``flows.retries``)."""

    PAUSE_S = 60.0

    def __init__(self) -> None:
        self._down_until = 0.0

    def __call__(self, what: str, report: Callable[[], object]) -> None:
        if time.monotonic() < self._down_until:
            return
        try:
            report()
        except MlflowException as error:
            failure = store_failure(error)
            if failure is None:
                raise
            logger.warning("Could not log %s: %s; training goes on (reports paused for a minute)", what, failure)
            self._down_until = time.monotonic() + self.PAUSE_S


class MLflowReporter(L.Callback):
    """Logs ``module.logged`` every ``log_every`` steps (with images/s) and ``grid(module)``
    every ``image_every`` steps, to one MLflow run by id.

    ``grid_s`` records how long each grid took to draw (sampling, for the sweep's time account).
    Images/s counts the training batches only (``module.train_seconds``, which
    ``training.Budget`` keeps): grids, FID evaluations and checkpoints are not training, and
    counting them would make a factor with expensive evaluations look slower than it trains."""

    def __init__(
        self, run_id: str, budget: TrainingBudget, grid: Callable[[L.LightningModule], Image.Image], grid_name: str
    ):
        self.run_id, self.budget, self.grid, self.grid_name = run_id, budget, grid, grid_name
        self.client = mlflow.MlflowClient()
        self.report = WhileTheStoreBlips()
        self._since = 0.0  # module.train_seconds at the last log
        self._images = 0

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._since = float(module.train_seconds)  # a resumed run continues its count

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, *_) -> None:
        step = int(module.steps)
        self._images += len(batch[0]) * trainer.world_size  # every training process took a batch
        if step % self.budget.log_every == 0:
            elapsed = float(module.train_seconds) - self._since
            metrics = {name: float(value) for name, value in module.logged.items()}
            metrics["train_img_per_s"] = self._images / max(elapsed, 1e-9)
            metrics["images_seen"] = step * self.budget.batch_size * trainer.world_size
            self.report(f"metrics at step {step}", lambda: log_metrics(self.run_id, metrics, step, self.client))
            self._since, self._images = float(module.train_seconds), 0
        if step % self.budget.image_every == 0:
            started = time.perf_counter()
            with torch.random.fork_rng(devices=[]):  # a grid must not move training's random stream
                image = self.grid(module)
            grid_s = time.perf_counter() - started
            self.report(f"{self.grid_name} at step {step}", lambda: self._log_grid(image, grid_s, step))

    def _log_grid(self, image: Image.Image, seconds: float, step: int) -> None:
        log_metrics(self.run_id, {"grid_s": seconds}, step, self.client)
        self.client.log_image(self.run_id, image, key=self.grid_name, step=step)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """What the sweep compares budgets by: steps, images and training seconds."""
        step = int(module.steps)
        totals = {
            "steps": step,
            "images_seen": step * self.budget.batch_size * trainer.world_size,
            "wall_time_s": float(module.train_seconds),
        }
        log_metrics(self.run_id, totals, step, self.client)


class ShareCheckpoints(L.Callback):
    """Copies each new ``last.ckpt`` into the run (artifact ``checkpoint/``), so that a run
    killed on one machine resumes on any other (``artifacts.fetch_checkpoint``); publishing the
    model drops it. After ``training.PeriodicCheckpoint`` has written it (callbacks run in
    order: the stage's come after the checkpointing one)."""

    def __init__(self, run_id: str, checkpoint_dir: Path):
        self.run_id, self.path = run_id, Path(checkpoint_dir) / LAST
        self.client = mlflow.MlflowClient()
        self.report = WhileTheStoreBlips()
        self._shared: int | None = None

    def on_train_batch_end(self, *_) -> None:
        self._share()

    def on_train_end(self, *_) -> None:
        self._share()

    def _share(self) -> None:
        written = self.path.stat().st_mtime_ns if self.path.exists() else None
        if written is not None and written != self._shared:
            self.report("the checkpoint", lambda: self.client.log_artifact(self.run_id, str(self.path), CHECKPOINT))
            self._shared = written


class BudgetCurve(L.Callback):
    """Logs ``evaluate()``'s metrics at ``points`` equal shares of the training budget (``progress``:
    0..1 of it spent, ``training.Budget.progress``), the last at the end: the budget curve, the
    paper's Figure 6. Each point is logged at the training step, with ``train_s`` (training
    seconds so far), and its KID again as ``kid_by_train_s`` at step = training seconds, so the
    MLflow UI draws the factors side by side against wall time. Not timed by ``training.Budget``.

    The evaluation runs on a fork of the global random state: how much randomness it draws
    depends on things outside the run (a DataLoader draws a seed when torch-fidelity computes
    reference features that are not cached yet), and it must not change the noise and timesteps
    training draws next, or a reproduction would train differently from the original."""

    def __init__(
        self,
        run_id: str,
        points: int,
        progress: Callable[[L.LightningModule], float],
        evaluate: Callable[[], dict[str, float]],
    ):
        self.run_id, self.points, self.progress, self.evaluate = run_id, points, progress, evaluate
        self.client = mlflow.MlflowClient()
        self.report = WhileTheStoreBlips()
        self._reached = 0  # points passed (a resumed run does not redo those before its checkpoint)
        self._last = -1

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._reached = self._points_reached(module)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *_) -> None:
        reached = self._points_reached(module)
        if reached > self._reached:
            self._reached = reached
            self.record(module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if int(module.steps) != self._last:  # (a run resumed at its end, or stopped early)
            self.record(module)

    def _points_reached(self, module: L.LightningModule) -> int:
        return int(self.progress(module) * self.points + 1e-9)

    def record(self, module: L.LightningModule) -> None:
        step, train_s = int(module.steps), float(module.train_seconds)
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # why: the class docstring
            values = dict(self.evaluate())
        values |= {"train_s": train_s, "budget_eval_s": time.perf_counter() - started}

        def log() -> None:
            log_metrics(self.run_id, values, step, self.client)
            if "kid_mean" in values:
                log_metrics(self.run_id, {"kid_by_train_s": values["kid_mean"]}, round(train_s), self.client)

        self.report(f"the evaluation at step {step}", log)
        self._last = step
