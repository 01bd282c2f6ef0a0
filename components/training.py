"""Lightning plumbing shared by the training stages: budgets and checkpoints (reporting to
MLflow is ``components.mlflow_callbacks``, which a stage passes in).

Checkpoints are written atomically to ``<dir>/last.ckpt`` every N steps (at most one per
``checkpoint_minutes``) and at the end, so a killed run resumes from its last checkpoint
(``fit(..., ckpt_path=last, weights_only=True)``).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
import zipfile
from pathlib import Path

import pytorch_lightning as L
import torch
from pytorch_lightning.strategies import DDPStrategy

from components import progress
from components.errors import UserError
from components.params import TrainingBudget
from components.workspace import write_atomically

LAST = "last.ckpt"
CHECKPOINT = "checkpoint"  # the run artifact folder a training run shares its latest LAST in (mlflow_callbacks)

# Noise on every training that says nothing about it: Lightning's advertisement for its cloud
# logger, and a deprecation inside Lightning's own use of torch's pytree.
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
    lambda record: not record.getMessage().startswith("💡 Tip")
)
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class Budget(L.Callback):
    """Stops at ``max_steps`` batches or ``max_minutes`` of training, whichever comes first.

    Both are counted in the module's own buffers (``steps``, ``train_seconds``), so they are
    checkpointed and a resumed run continues the same budget. Only the batches are timed:
    sample grids, FID evaluations and checkpoints (other callbacks, after this one) are not, so
    an equal-time comparison is not skewed by how expensive a factor's evaluation is.
    (Lightning's ``global_step`` would count two optimizer steps per GAN batch.)
    """

    def __init__(self, max_steps: int, max_minutes: float | None):
        self.max_steps, self.max_seconds = max_steps, (max_minutes or float("inf")) * 60
        self._started = 0.0

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        add_budget_buffers(module)  # before Lightning restores a checkpoint into the module

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # Resumed from the final checkpoint (killed between training and publishing): no extra batch.
        if self.progress(module) >= 1.0:
            trainer.should_stop = True

    def on_train_batch_start(self, *_) -> None:
        self._started = time.perf_counter()

    def progress(self, module: L.LightningModule) -> float:
        """How much of the budget is spent, 0..1: steps or seconds, whichever runs out first."""
        return min(1.0, max(int(module.steps) / self.max_steps, float(module.train_seconds) / self.max_seconds))

    def remaining_s(self, module: L.LightningModule, steps_per_s: float | None) -> float | None:
        """Training seconds left: by the clock, or by the steps left at ``steps_per_s``."""
        left = [self.max_seconds - float(module.train_seconds)]
        if steps_per_s:
            left.append((self.max_steps - int(module.steps)) / steps_per_s)
        finite = [max(0.0, s) for s in left if math.isfinite(s)]
        return min(finite) if finite else None

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *_) -> None:
        module.steps += 1
        # Every rank counts rank 0's time: ranks that disagreed would stop at different steps
        # (one waiting forever for the other) and follow different learning-rate curves.
        module.train_seconds += trainer.strategy.broadcast(time.perf_counter() - self._started)
        if int(module.steps) >= self.max_steps or float(module.train_seconds) >= self.max_seconds:
            trainer.should_stop = True


class ReportProgress(L.Callback):
    """Hands the loop's numbers to ``components.progress`` (which decides what to print) at most
    once a second: a progress bar redrawn every step costs 4-5 ms, 7 % of a 70 ms step at
    f = 32 (measured with Lightning's default bar)."""

    def __init__(self, budget: Budget):
        self.budget = budget
        self._last = (0.0, 0, 0.0)  # (monotonic time, step, training seconds) at the last report
        self._images = 0

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._last = (time.monotonic(), int(module.steps), float(module.train_seconds))

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, *_) -> None:
        if not trainer.is_global_zero:
            return
        self._images += len(batch[0]) * trainer.world_size
        now, step, seconds = time.monotonic(), int(module.steps), float(module.train_seconds)
        if now - self._last[0] < 1.0 and not trainer.should_stop:
            return
        spent = max(seconds - self._last[2], 1e-9)
        loss = module.logged.get("train_loss")
        progress.training(
            progress.Training(
                fraction=self.budget.progress(module),
                step=step,
                loss=None if loss is None else float(loss),
                img_per_s=self._images / spent,
                remaining_s=self.budget.remaining_s(module, (step - self._last[1]) / spent),
            )
        )
        self._last, self._images = (now, step, seconds), 0


class CosineDecay(L.Callback):
    """Every optimizer's learning rate follows half a cosine from its initial value to 0 over
    the budget. The budget may be wall time, so the schedule is driven by ``Budget.progress``
    rather than a step-indexed torch scheduler; the initial value is kept in the param group,
    which is checkpointed, so a resumed run continues the same curve."""

    def __init__(self, budget: Budget):
        self.budget = budget

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, *_) -> None:
        scale = 0.5 * (1 + math.cos(math.pi * self.budget.progress(module)))
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * scale


def add_budget_buffers(module: L.LightningModule) -> None:
    """The counters ``Budget`` keeps in a module (and so in its checkpoints), unless it has them."""
    if hasattr(module, "steps"):
        return
    module.register_buffer("steps", torch.zeros((), dtype=torch.long))
    module.register_buffer("train_seconds", torch.zeros((), dtype=torch.float64))


class PeriodicCheckpoint(L.Callback):
    """Every ``every`` steps, unless the last save is less than ``min_seconds`` old: at f = 32
    a step takes 70 ms, and saving every 100 steps would cost as much as 3 % of the budget."""

    def __init__(self, directory: Path, every: int, min_seconds: float = 0.0):
        self.path, self.every, self.min_seconds = Path(directory) / LAST, every, min_seconds
        self._saved = time.monotonic()

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._saved = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *_) -> None:
        # Rank 0's clock decides (broadcast): saving is a collective that every rank must enter.
        due = int(module.steps) % self.every == 0
        if due and trainer.strategy.broadcast(time.monotonic() - self._saved >= self.min_seconds):
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        def full_state(path: Path) -> None:  # to resume; a collective that only rank 0 writes
            trainer.save_checkpoint(path, weights_only=False)

        if trainer.is_global_zero:
            write_atomically(self.path, full_state)  # never a half-written last.ckpt, nor a stray partial
        else:
            full_state(self.path)
        self._saved = time.monotonic()


class Diverged(UserError):
    """The training loss became NaN or infinite: the run fails, and nothing is registered."""


class FiniteLoss(L.Callback):
    """Stops the stage at the first non-finite loss: a NaN model would train on to the end of its
    budget, be evaluated and be registered. (Every rank checks its own loss; DDP's averaged
    gradients spread a NaN to every rank within a step, so all stop.)"""

    def __init__(self, section: str):
        self.section = section

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *_) -> None:
        loss = getattr(module, "logged", {}).get("train_loss")
        if loss is not None and not torch.isfinite(loss):
            raise Diverged(
                f"Training diverged: the {self.section} loss is {float(loss)} at step {int(module.steps)}. The run "
                f"fails and registers nothing; lower {self.section}.lr (now {trainer.optimizers[0].param_groups[0]['lr']:g})"
                f" or set {self.section}.precision=32-true, and rerun."
            )


class RanksAgree(L.Callback):
    """With several training processes: at the end, every rank must hold the same weights and
    averages (the EMA, through ``on_save_checkpoint``), or what rank 0 saves and publishes is
    not what was trained. DDP averages the gradients; this checks that nothing else diverged.
    (Not the buffers: DDP hands every rank rank 0's at each step, and the discriminator's
    BatchNorm statistics then differ by that step's batch, which nothing uses.)"""

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        extra: dict = {}
        module.on_save_checkpoint(extra)
        digest = torch.zeros((), dtype=torch.float64)
        for tensor in [*module.parameters(), *_tensors_in(extra)]:
            if tensor.is_floating_point():
                digest += tensor.detach().double().sum().cpu()
        digest = digest.to(module.device)  # where the backend gathers from: NCCL needs CUDA tensors
        digests = [torch.zeros_like(digest) for _ in range(trainer.world_size)]
        torch.distributed.all_gather(digests, digest)
        if len(set(map(float, digests))) > 1:
            raise RuntimeError(f"The {trainer.world_size} training processes ended with different weights: {digests}")


def _tensors_in(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [t for item in value for t in _tensors_in(item)]
    return []


def require_cuda(section: str) -> None:
    """``<section>.accelerator=cuda`` needs a CUDA GPU that PyTorch can use on this machine."""
    if not torch.cuda.is_available():
        raise UserError(
            f"{section}.accelerator=cuda, but this machine has no CUDA GPU that PyTorch can use: run it where "
            f"there is one, or --set {section}.accelerator=auto (a GPU if any, else the CPU)."
        )


def check_trainable(images: int, budget: TrainingBudget, section: str) -> None:
    """Refuse, before a run opens, what cannot train here: a GPU asked for on a machine without
    one, or a train split smaller than one batch per training process (batches drop the
    remainder, so it would train zero steps and still finish, and register, a model)."""
    if budget.accelerator == "cuda":
        require_cuda(section)
    if images // budget.devices < budget.batch_size:
        per_process = f" per process ({section}.devices={budget.devices})" if budget.devices > 1 else ""
        fits = max(1, images // budget.devices)
        raise UserError(
            f"The train split has {images} images, fewer than {section}.batch_size={budget.batch_size}{per_process},"
            f" so nothing would train: lower it (--set {section}.batch_size={fits}) or add images."
        )


def make_trainer(
    budget: TrainingBudget,
    checkpoint_dir: Path,
    callbacks: list[L.Callback],
    precision: str = "32-true",
    manual_optimization: bool = False,
    section: str = "ae",
) -> L.Trainer:
    """``precision``: decided (``components.precision.decide``), not ``auto``. With ``budget.devices`` > 1,
    inside ``distributed.ranks`` (which starts the other processes); ``manual_optimization``:
    the module steps several optimisers, so each backward leaves some parameters out;
    ``section``: the budget's parameter section, as messages name it."""
    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    limits = Budget(budget.max_steps, budget.max_minutes)
    schedule = [CosineDecay(limits)] if budget.lr_schedule == "cosine" else []
    several = budget.devices > 1
    return L.Trainer(
        max_epochs=-1,
        max_steps=-1,
        accelerator=budget.accelerator,
        devices=budget.devices,
        strategy=DDPStrategy(find_unused_parameters=manual_optimization) if several else "auto",
        precision=precision,
        callbacks=[
            limits,
            *schedule,
            ReportProgress(limits),
            FiniteLoss(section),
            PeriodicCheckpoint(checkpoint_dir, budget.checkpoint_every, budget.checkpoint_minutes * 60),
            *([RanksAgree()] if several else []),
            *callbacks,
        ],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,  # ReportProgress instead
        default_root_dir=str(checkpoint_dir),
        num_sanity_val_steps=0,
    )


def fit(trainer: L.Trainer, module: L.LightningModule, loader, checkpoint_dir: Path) -> None:
    """Train, resuming from ``checkpoint_dir/last.ckpt`` when a previous attempt left one and it
    is whole (else it is set aside, named in a warning, and training starts over)."""
    last = Path(checkpoint_dir) / LAST
    resume = last.exists() and _whole(last)  # (every rank reads the same file: all decide alike)
    if last.exists() and not resume and trainer.is_global_zero:
        _set_aside(last)
    trainer.fit(module, loader, ckpt_path=str(last) if resume else None, weights_only=True)
    if trainer.interrupted:
        raise KeyboardInterrupt


def _whole(checkpoint: Path) -> bool:
    """Whether a checkpoint (torch's zip format) reads back byte for byte: every member's CRC."""
    try:
        with zipfile.ZipFile(checkpoint) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def _set_aside(checkpoint: Path) -> None:
    """Move a damaged checkpoint out of the way, keeping it for a post-mortem."""
    kept = checkpoint.with_name(f"{checkpoint.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    checkpoint.replace(kept)
    progress.log.warning(
        "The checkpoint %s is damaged (truncated or corrupt): set aside as %s; training starts over.",
        checkpoint,
        kept.name,
    )
