"""The Lightning callbacks that report training to MLflow (components/tracking.py), on a tiny
model trained for a few steps with the stages' own trainer, into a real (SQLite) MLflow run."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import mlflow
import pytest
import pytorch_lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from components.mlflow_callbacks import BudgetCurve, MLflowReporter
from components.params import TrainingBudget
from components.tracking import log_metrics
from components.training import Budget, add_budget_buffers, fit, make_trainer

BATCH = 2


class TinyModule(L.LightningModule):
    """One Linear layer; remembers what it put in ``logged`` at each step, for the assertions."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        add_budget_buffers(self)
        self.logged: dict[str, torch.Tensor] = {}
        self.logged_at: dict[int, dict[str, float]] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.logged = {"train_loss": loss.detach(), "weight_norm": self.layer.weight.detach().norm()}
        step = int(self.steps) + 1  # the step this batch completes (``Budget`` counts it at batch end)
        self.logged_at[step] = {name: float(value) for name, value in self.logged.items()}
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def budget(**settings) -> TrainingBudget:
    """A few steps on the CPU; checkpoints only at the end."""
    return TrainingBudget(**{"batch_size": BATCH, "checkpoint_every": 10_000, "accelerator": "cpu", **settings})


def train(tmp_path: Path, budget: TrainingBudget, callbacks: list[L.Callback]) -> TinyModule:
    """Train a ``TinyModule`` as the stages do (``make_trainer``, ``fit``) within ``budget``."""
    torch.manual_seed(0)
    module = TinyModule()
    loader = DataLoader(TensorDataset(torch.randn(16, 4), torch.randn(16, 1)), batch_size=BATCH, drop_last=True)
    checkpoints = tmp_path / "checkpoints"
    fit(make_trainer(budget, checkpoints, callbacks), module, loader, checkpoints)
    return module


def blank(module: L.LightningModule) -> Image.Image:
    return Image.new("RGB", (8, 8))


def history(run_id: str, name: str) -> list[tuple[int, float]]:
    points = mlflow.MlflowClient().get_metric_history(run_id, name)
    return sorted((m.step, m.value) for m in points)


def steps(run_id: str, name: str) -> list[int]:
    return [step for step, _ in history(run_id, name)]


@pytest.fixture
def run_id(mlflow_store: str) -> str:
    return mlflow.MlflowClient().create_run(mlflow_store).info.run_id


def test_reporter_logs_the_modules_metrics_and_throughput_every_log_every_steps(tmp_path, run_id):
    limits = budget(max_steps=7, log_every=2, image_every=1000)
    module = train(tmp_path, limits, [MLflowReporter(run_id, limits, blank, "grid")])
    assert int(module.steps) == 7
    for name in ("train_loss", "weight_norm"):
        assert history(run_id, name) == [(s, pytest.approx(module.logged_at[s][name])) for s in (2, 4, 6)]
    throughput = history(run_id, "train_img_per_s")
    assert [s for s, _ in throughput] == [2, 4, 6] and all(v > 0 for _, v in throughput)


def test_reporter_throughput_leaves_out_time_spent_on_grids_and_evaluations(tmp_path, run_id):
    limits = budget(max_steps=8, log_every=2, image_every=4)

    def slow_grid(module: L.LightningModule) -> Image.Image:
        time.sleep(0.5)  # far longer than the tiny model's training steps
        return blank(module)

    slow_evaluation = BudgetCurve(run_id, 2, Budget(8, None).progress, lambda: time.sleep(0.5) or {"kid_mean": 1.0})
    module = train(tmp_path, limits, [MLflowReporter(run_id, limits, slow_grid, "grid"), slow_evaluation])
    rates = [value for _, value in history(run_id, "train_img_per_s")]
    # 2 batches of 2 images per window: had the 1 s of grid + evaluation at step 4 counted, the
    # window after it would show at most 4 img/s.
    assert len(rates) == 4 and min(rates) > 4 / 0.5
    assert float(module.train_seconds) < 0.5


def test_reporter_logs_an_image_every_image_every_steps(tmp_path, run_id):
    limits = budget(max_steps=7, log_every=1000, image_every=3)
    drawn = []

    def grid(module):
        drawn.append(module)
        return Image.new("RGB", (8, 8), (40 * len(drawn), 0, 0))

    module = train(tmp_path, limits, [MLflowReporter(run_id, limits, grid, "samples")])
    assert len(drawn) == 2 and all(drawn_from is module for drawn_from in drawn)
    names = [a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "images")]
    logged = sorted(int(re.search(r"samples\+step\+(\d+)\+", n).group(1)) for n in names if n.endswith(".png"))
    assert logged == [3, 6]


def test_reporter_logs_steps_images_and_training_time_at_the_end(tmp_path, run_id):
    limits = budget(max_steps=5, log_every=1000, image_every=1000)
    module = train(tmp_path, limits, [MLflowReporter(run_id, limits, blank, "grid")])
    assert history(run_id, "steps") == [(5, 5.0)]
    assert history(run_id, "images_seen") == [(5, 5.0 * BATCH)]
    ((step, wall),) = history(run_id, "wall_time_s")
    assert step == 5 and wall == pytest.approx(float(module.train_seconds)) and wall > 0
    assert not steps(run_id, "train_loss")  # log_every was never reached


def test_budget_curve_evaluates_at_equal_shares_of_the_budget_and_logs_them_against_training_time(tmp_path, run_id):
    calls = []

    def evaluate():
        calls.append(None)
        time.sleep(0.01)
        return {"kid_mean": 1.0 / len(calls), "kid_ci_low": 0.0, "kid_ci_high": 2.0}

    limits = budget(max_steps=9)
    curve = BudgetCurve(run_id, 3, Budget(limits.max_steps, limits.max_minutes).progress, evaluate)
    module = train(tmp_path, limits, [curve])
    assert history(run_id, "kid_mean") == [(3, 1.0), (6, 0.5), (9, pytest.approx(1 / 3))]
    assert steps(run_id, "kid_ci_high") == steps(run_id, "budget_eval_s") == steps(run_id, "train_s") == [3, 6, 9]
    assert all(seconds >= 0.01 for _, seconds in history(run_id, "budget_eval_s"))  # (not training time)
    train_s = [seconds for _, seconds in history(run_id, "train_s")]
    assert train_s == sorted(train_s) and train_s[-1] == pytest.approx(float(module.train_seconds))
    # the same KIDs against training seconds, for the MLflow UI's side-by-side charts
    by_time = history(run_id, "kid_by_train_s")  # (sorted by step, then value)
    assert sorted(value for _, value in by_time) == [pytest.approx(1 / 3), 0.5, 1.0]
    assert sorted(s for s, _ in by_time) == [round(t) for t in train_s]


def test_budget_curve_ends_with_an_evaluation_when_the_budget_stops_between_points(tmp_path, run_id):
    calls = []

    def evaluate():
        calls.append(None)
        return {"kid_mean": float(len(calls))}

    # training stops at step 7 (say, told to), between the curve's points at 5 and 10
    train(tmp_path, budget(max_steps=7), [BudgetCurve(run_id, 2, Budget(10, None).progress, evaluate)])
    assert history(run_id, "kid_mean") == [(5, 1.0), (7, 2.0)]


class CountingClient(mlflow.MlflowClient):
    def __init__(self):
        super().__init__()
        self.batches = 0

    def log_batch(self, *args, **kwargs):
        self.batches += 1
        return super().log_batch(*args, **kwargs)


def test_log_metrics_writes_all_metrics_at_the_step_in_one_call(run_id):
    client = CountingClient()
    log_metrics(run_id, {"fid": 12.5, "kid_mean": torch.tensor(0.25), "steps": 40}, step=40, client=client)
    assert client.batches == 1
    assert {name: history(run_id, name) for name in ("fid", "kid_mean", "steps")} == {
        "fid": [(40, 12.5)],
        "kid_mean": [(40, 0.25)],
        "steps": [(40, 40.0)],
    }


def test_log_metrics_reaches_a_run_that_is_not_active_at_step_zero_by_default(run_id):
    assert mlflow.active_run() is None
    log_metrics(run_id, {"flops_per_step": 3e9})
    assert history(run_id, "flops_per_step") == [(0, 3e9)]


class SaveCounter(L.Callback):
    """Counts ``last.ckpt`` writes by watching its modification time after every batch."""

    def __init__(self, path: Path):
        self.path, self.saves, self._seen = path, [], None

    def on_train_batch_end(self, trainer, module, *_):
        stamp = self.path.stat().st_mtime_ns if self.path.exists() else None
        if stamp != self._seen:
            self.saves.append(int(module.steps))
            self._seen = stamp


@pytest.mark.parametrize(("minutes", "expected"), [(0, [2, 4, 6]), (60, [])])
def test_checkpoints_every_n_steps_but_at_most_one_per_checkpoint_minutes(tmp_path, minutes, expected):
    counter = SaveCounter(tmp_path / "checkpoints" / "last.ckpt")
    train(tmp_path, budget(max_steps=7, checkpoint_every=2, checkpoint_minutes=minutes), [counter])
    assert counter.saves == expected
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()  # the end is always saved


def test_a_run_resumed_after_its_budget_ran_out_trains_no_further_batch(tmp_path):
    first = train(tmp_path, budget(max_steps=5), [])
    again = train(tmp_path, budget(max_steps=5), [])  # killed after training, before publishing: rerun
    assert int(first.steps) == int(again.steps) == 5
    assert torch.equal(again.layer.weight, first.layer.weight)


class LearningRates(L.Callback):
    def __init__(self):
        self.seen: list[float] = []

    def on_train_batch_end(self, trainer, module, *_):
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_cosine_schedule_decays_the_learning_rate_over_the_budget(tmp_path):
    rates = LearningRates()
    train(tmp_path, budget(max_steps=8, lr_schedule="cosine"), [rates])
    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]  # SGD lr 0.1, at each batch's start
    assert rates.seen == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("s3://AKIA:se/cr@t@minio:9000/bucket", "s3://***@minio:9000/bucket"),
        ("http://user:p%40ss@host/x", "http://***@host/x"),
        ("https://token@host/api", "https://***@host/api"),
        ("remote s3://k:s@h/b and http://u:v@w/z", "remote s3://***@h/b and http://***@w/z"),
        ("http://127.0.0.1:5000/api", "http://127.0.0.1:5000/api"),  # nothing to hide
        ("s3://bucket/data@v2/x", "s3://bucket/data@v2/x"),
    ],
)
def test_credentials_in_urls_are_redacted_whatever_the_password_holds(text, expected):
    from components.credentials import redact

    assert redact(text) == expected


def test_the_experiment_is_marked_as_model_training_so_the_ui_opens_on_its_runs(mlflow_store):
    from components.tracking import use_experiment

    assert "mlflow.experimentKind" not in mlflow.get_experiment(mlflow_store).tags  # made by MLflow itself
    assert use_experiment("latentlab") == mlflow_store
    assert mlflow.get_experiment(mlflow_store).tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_project_folder_whose_path_the_sqlite_uri_cannot_hold_is_refused_and_others_keep_the_store_inside(
    tmp_path, cli, monkeypatch
):
    """SQLAlchemy ends a database path at "?" (the store landed outside the project, at the
    folder's prefix) and decodes "%XX"; "#", spaces and non-ASCII letters are fine."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    refused = tmp_path / "runs?v=2"
    refused.mkdir()
    done = cli(refused, "train-ae")
    assert done.returncode == 2 and "'?' or '%' in its path" in " ".join((done.stderr + done.stdout).split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs?v=2"] and not any(refused.iterdir())

    from components.tracking import use_experiment

    kept = tmp_path / "runs #1 ü"
    kept.mkdir()
    monkeypatch.chdir(kept)
    use_experiment("latentlab")
    with mlflow.start_run() as run:
        mlflow.log_text("kept", "note.txt")
    assert (kept / "mlflow.db").is_file() and (kept / "mlartifacts").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs #1 ü", "runs?v=2"]
    assert mlflow.get_run(run.info.run_id).info.status == "FINISHED"
