"""What a crash, a failing disk or a diverging run leaves behind never stops or poisons the next
run: damaged checkpoints are set aside, a NaN loss fails its stage, files are whole or absent."""

from __future__ import annotations

import os

import pytest
import pytorch_lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from components.params import TrainingBudget
from components.training import LAST, Diverged, fit, make_trainer
from components.workspace import write_atomically


class Tiny(L.LightningModule):
    """A linear regression whose loss turns NaN from step ``nan_from`` on (never, by default)."""

    def __init__(self, nan_from: int = 10**9):
        super().__init__()
        self.layer, self.nan_from = torch.nn.Linear(2, 1), nan_from

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        if int(self.steps) >= self.nan_from:
            loss = loss * float("nan")
        self.logged = {"train_loss": loss.detach()}
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _train(directory, module: Tiny, steps: int = 4) -> Tiny:
    budget = TrainingBudget(batch_size=2, max_steps=steps, checkpoint_every=2, accelerator="cpu")
    data = DataLoader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=2)
    fit(make_trainer(budget, directory, []), module, data, directory)
    return module


def test_a_truncated_checkpoint_is_set_aside_and_training_starts_over(tmp_path):
    _train(tmp_path, Tiny(), steps=2)
    last = tmp_path / LAST
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # as a crash or a full disk leaves it
    resumed = _train(tmp_path, Tiny(), steps=4)  # without the fix: every resume fails for good
    assert int(resumed.steps) == 4
    kept = [p.name for p in tmp_path.iterdir() if p.name.startswith(f"{LAST}.damaged-")]
    assert len(kept) == 1, sorted(p.name for p in tmp_path.iterdir())
    assert torch.load(last, weights_only=True)["state_dict"]["steps"] == 4  # a whole one again
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_a_non_finite_loss_fails_the_stage_at_the_step_it_appears(tmp_path):
    with pytest.raises(Diverged, match=r"the ae loss is nan at step 3\b.*lower ae.lr \(now 0.01\)"):
        _train(tmp_path, Tiny(nan_from=2), steps=50)


def test_an_atomic_write_reaches_the_disk_and_a_failed_one_leaves_the_old_file(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    path = tmp_path / "report.md"
    write_atomically(path, lambda partial: partial.write_text("new"))
    assert path.read_text() == "new"
    assert synced[-1] == str(tmp_path) and synced[-2].endswith(".partial")  # the bytes, then the rename

    def fail(partial):
        partial.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomically(path, fail)
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["report.md"]
