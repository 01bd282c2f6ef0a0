"""Progress of long work, for the person waiting: which factor of how many, which phase, how far
training is into its budget, and when the sweep should end.

Flows mark their phases (``with phase("LDM training"):``), the sweep marks its factors
(``with sweep_plan(...)``, ``with factor(...)``) and the training loop reports its numbers
(``training(...)``); this module alone decides what reaches the screen. On a terminal that is a
rich progress display; in a log file (a scheduled run, ``nohup``, CI) one line when a phase
starts and ends and a status line at least every ``TICK_S`` seconds while it runs.

The sweep's ETA comes from its budgets: each factor is expected to take its training budget
plus the time outside training (latents, grids, FID, evaluation) that the latest finished
factor of its kind took, or ``OVERHEAD_S`` before any has. The latest, not the mean: factors run
in ascending f and that time shrinks with f (f = 2 about 3 min on the main job, f = 32 seconds),
so the latest is the closest guide and, if anything, pessimistic. Of its kind: pixel space
(f = 1) samples 64x64 pixels, 6 min of it, so projecting it onto the latent factors put the
main job's ETA 20 minutes late until f = 2 finished.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

RESULT_NEUTRAL = True  # what reaches the console, never what a run computes: not part of any stage's code identity

T = TypeVar("T")
log = logging.getLogger("latentlab")
TICK_S = 25.0  # a log file hears from a running phase this often (the promise: every 30 s)
# Per factor, outside training: latents, sample grids, FID during training, evaluation. Measured
# on the main job (48 min for 33 min of training budget, data and extractor included): ~2 min.
OVERHEAD_S = 120.0


@dataclass
class Training:
    """The training loop's latest numbers."""

    fraction: float  # of the budget spent, 0..1
    step: int
    loss: float | None
    img_per_s: float | None
    remaining_s: float | None  # of the budget, when it is wall time or the step rate is known


@dataclass
class Phase:
    name: str
    factor: str  # the sweep plan's key ("f=8"), or "" outside a sweep
    label: str  # what the screen calls it: "f=8 (3/6)"
    started: float = field(default_factory=time.monotonic)
    training: Training | None = None
    doing: str = ""  # what ``track`` is going through: "Sampling (50 DDIM steps) 2/4"
    said: float = field(default_factory=time.monotonic)  # when its last line was printed

    @property
    def where(self) -> str:
        return f"{self.label} {self.name}" if self.label else self.name

    def describe(self) -> str:
        return f"{self.where}: {self.status()}"

    def status(self) -> str:
        """ "step 1,210, loss 0.0712, 185 img/s, 1:10 of budget left", or "1:00 in, Sampling ... 2/4"."""
        t = self.training
        if t is None:
            doing = f", {self.doing}" if self.doing else ""
            return f"{_clock(time.monotonic() - self.started)} in{doing}"
        parts = [f"step {t.step:,}"]
        if t.loss is not None:
            parts.append(f"loss {t.loss:.4g}")
        if t.img_per_s:
            parts.append(f"{t.img_per_s:.0f} img/s")
        if t.remaining_s is not None:
            parts.append(f"{_clock(t.remaining_s)} of budget left")
        return ", ".join(parts)


@dataclass
class FactorClock:
    budget_s: float | None  # training seconds it is given (None: a step budget)
    pixel_space: bool = False  # f = 1: no first stage, and the slowest sampling by far
    started: float | None = None
    finished: float | None = None


class SweepPlan:
    """The sweep's factors and their budgets, and from them and the clock, its ETA."""

    def __init__(self, factors: dict[str, float | None], workers: int = 1, pixel_space: Iterable[str] = ()):
        pixel = set(pixel_space)
        self.factors = {label: FactorClock(budget, label in pixel) for label, budget in factors.items()}
        self.workers = max(1, workers)

    def keep(self, names: list[str]) -> None:
        """Only these factors are left to do (a resumed sweep)."""
        self.factors = {name: clock for name, clock in self.factors.items() if name in names}

    def label(self, name: str) -> str:
        """ "f=8 (3/6)": the factor's place in the sweep."""
        return f"{name} ({list(self.factors).index(name) + 1}/{len(self.factors)})"

    def overhead_s(self, clock: FactorClock) -> float:
        """Time outside training for ``clock``'s factor: the latest finished factor's of its kind
        (why: the module's docstring)."""
        seen = [
            (c.finished, c.finished - c.started - c.budget_s)
            for c in self.factors.values()
            if c.finished and c.budget_s and c.pixel_space == clock.pixel_space
        ]
        return max(0.0, max(seen)[1]) if seen else OVERHEAD_S

    def expected_s(self, clock: FactorClock) -> float:
        """A factor's whole duration: its budget and the overhead; for a step budget, as long as
        the latest finished factor of its kind took (or the overhead alone before any finished)."""
        if clock.budget_s is not None:
            return clock.budget_s + self.overhead_s(clock)
        done = [
            (c.finished, c.finished - c.started)
            for c in self.factors.values()
            if c.finished and c.pixel_space == clock.pixel_space
        ]
        return max(done)[1] if done else self.overhead_s(clock)

    def remaining_s(self, now: float, training_left: dict[str, float]) -> float:
        """Seconds until the last factor ends. ``training_left``: running factors' training budget
        left in their current phase (a factor over its expected time still has that much)."""
        left = 0.0
        for label, clock in self.factors.items():
            if clock.finished:
                continue
            expected = self.expected_s(clock)
            if clock.started is None:
                left += expected
            else:
                left += max(expected - (now - clock.started), training_left.get(label, 0.0))
        return left / self.workers


class Reporter:
    """The one owner of what progress reaches the screen."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phases: dict[int, Phase] = {}  # by thread: factors may run in worker threads
        self._factor = threading.local()
        self.plan: SweepPlan | None = None
        self.console = Console(stderr=True)
        self.quiet = False
        self._display: Progress | None = None
        self._rows: dict[int, int] = {}  # thread -> display row
        self._ticker: threading.Thread | None = None

    # ------------------------------------------------------------------ what flows and loops report

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        key = getattr(self._factor, "key", "")
        current = Phase(name, key, self.plan.label(key) if self.plan and key in self.plan.factors else key)
        thread = threading.get_ident()
        with self._lock:
            outer = self._phases.get(thread)
            self._phases[thread] = current
        self._start_output()
        self.say(f"{current.where} started{self._eta_text()}")
        finished = False
        try:
            yield
            finished = True
        finally:
            with self._lock:
                if outer is None:
                    self._phases.pop(thread, None)
                else:
                    self._phases[thread] = outer
                self._end_display(thread, outer)
            ended = "done in" if finished else "stopped after"  # (an error, or an interrupt)
            self.say(f"{current.where} {ended} {_clock(time.monotonic() - current.started)}")

    def training(self, numbers: Training) -> None:
        """The training loop's latest numbers (cheap: printing is the ticker's job)."""
        current = self._phases.get(threading.get_ident())
        if current is not None:
            current.training = numbers

    @contextmanager
    def sweep_plan(self, plan: SweepPlan) -> Iterator[SweepPlan]:
        self.plan = plan
        try:
            yield plan
        finally:
            self.plan = None

    @contextmanager
    def factor(self, name: str) -> Iterator[None]:
        """Work for factor ``name`` (a key of the sweep plan) in this thread."""
        clock = self.plan.factors.get(name) if self.plan else None
        self._factor.key = name
        if clock:
            clock.started, clock.finished = time.monotonic(), None
        try:
            yield
        finally:
            if clock:
                clock.finished = time.monotonic()
            self._factor.key = ""

    def say(self, line: str) -> None:
        log.info(line)

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        """``items``, shown as a row of the progress display on a terminal; elsewhere named in the
        phase's next status line ("Sampling (50 DDIM steps) 2/4"), not a bar per batch."""
        display, current = self._display, self._phases.get(threading.get_ident())
        total = total if total is not None else _len(items)
        if display is None:
            for done, item in enumerate(items, 1):
                yield item
                if current is not None:  # for the status line
                    current.doing = f"{description} {done}/{total or '?'}"
            if current is not None:
                current.doing = ""
            return
        row = display.add_task(description, total=total, status="")
        try:
            for item in items:
                yield item
                display.advance(row)
        finally:
            display.remove_task(row)

    # ---------------------------------------------------------------------------------- the screen

    def eta_s(self) -> float | None:
        if self.plan is None:
            return None
        with self._lock:
            phases = list(self._phases.values())
        training_left = {p.factor: p.training.remaining_s or 0.0 for p in phases if p.training and p.factor}
        return self.plan.remaining_s(time.monotonic(), training_left)

    def _eta_text(self) -> str:
        eta = self.eta_s()
        if eta is None:
            return ""
        ends = (datetime.now() + timedelta(seconds=eta)).strftime("%H:%M")
        return f"; sweep ETA {ends} ({_clock(eta)} left)"

    def _start_output(self) -> None:
        with self._lock:
            if self._ticker is None:
                self._ticker = threading.Thread(target=self._tick, name="latentlab-progress", daemon=True)
                self._ticker.start()
            if self._display is None and self.console.is_terminal and not self.quiet:
                self._display = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(bar_width=24),
                    TextColumn("{task.percentage:>3.0f}%"),
                    TimeElapsedColumn(),
                    TextColumn("{task.fields[status]}"),
                    console=self.console,
                    transient=True,
                )
                self._display.start()

    def _tick(self) -> None:
        while True:
            time.sleep(1.0)
            eta, now, lines = self._eta_text(), time.monotonic(), []
            with self._lock:  # (a phase that ends meanwhile must not get its row back)
                for thread, phase in self._phases.items():
                    if self._display is not None:
                        self._show(thread, phase, eta)
                    elif now - phase.said >= TICK_S:
                        phase.said = now
                        lines.append(phase.describe() + eta)
            for line in lines:
                self.say(line)

    def _show(self, thread: int, phase: Phase, eta: str) -> None:
        done = 100 * (phase.training.fraction if phase.training else 0.0)
        status = phase.status() + eta
        if thread not in self._rows:
            self._rows[thread] = self._display.add_task(phase.where, total=100, status=status)
        self._display.update(self._rows[thread], completed=done, status=status, description=phase.where)

    def _end_display(self, thread: int, outer: Phase | None) -> None:
        """A thread's outermost phase ended: drop its row; with no phase left, the display."""
        if self._display is None or outer is not None:
            return
        if thread in self._rows:
            self._display.remove_task(self._rows.pop(thread))
        if not self._phases:
            self._display.stop()
            self._display = None


def _len(items: Iterable) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


def _clock(seconds: float) -> str:
    """ "1:05:07", "3:05", "0:42"."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


reporter = Reporter()
phase, training, track = reporter.phase, reporter.training, reporter.track
factor, sweep_plan = reporter.factor, reporter.sweep_plan


# ------------------------------------------------------------------------------------ verbosity

_CHATTY = ("pytorch_lightning", "lightning", "lightning_fabric", "mlflow")  # their INFO lines: hardware, database setup


class _Verbosity(logging.Filter):
    """What the console shows below WARNING: -1 nothing (the command prints its results
    itself), 0 our flows' lines and progress, 1 also Prefect's own (task runs created,
    finished) and the libraries' INFO lines."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level
        # Found here, not at import: model and data code import this module without Prefect.
        self.prefect_dir = str(Path(importlib.util.find_spec("prefect").origin).parent)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or self.level > 0:
            return True
        if self.level < 0:
            return False
        return not record.pathname.startswith(self.prefect_dir) and not record.name.startswith(_CHATTY)


def configure(level: int = 0) -> None:
    """Set what the console shows (``level``: -1 for ``-q``, 0 by default, 1 for ``-v``).
    Prefect's console handler (on the root logger) prints through ``reporter.console``, so its
    lines land above a progress display instead of through it."""
    import prefect.main  # noqa: F401  (sets up Prefect's logging, which `import prefect` defers)
    from prefect.logging.handlers import PrefectConsoleHandler

    reporter.quiet = level < 0
    log.setLevel(logging.INFO)
    # MLflow and diffusers log on handlers of their own and set their levels when first imported
    # (after this), from these variables; a user's own setting wins. diffusers warns of what this
    # project leaves out by design: "accelerate was not found", "text_encoder=None cannot be saved".
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if level > 0 else "WARNING")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "warning" if level > 0 else "error")
    # A tracking server's "View run <name> at: <url>" after every run: printed, not logged.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false" if level > 0 else "true")
    for name in _CHATTY:  # already imported: set them here too
        logging.getLogger(name).setLevel(logging.INFO if level > 0 else logging.WARNING)
    logging.getLogger("diffusers").setLevel(logging.WARNING if level > 0 else logging.ERROR)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.addFilter(_Verbosity(level))
            reporter.console = Console(file=handler.stream)
            handler.console = reporter.console
