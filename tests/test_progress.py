"""Progress reporting: the sweep's ETA from its budgets, status lines in a log file, and what
each verbosity lets through to the console."""

from __future__ import annotations

import logging
import time

import pytest

from components import progress
from components.progress import Reporter, SweepPlan, Training


def test_eta_is_the_budgets_plus_the_overhead_the_latest_finished_factor_of_its_kind_took():
    plan = SweepPlan({"f=1": 50.0, "f=2": 100.0, "f=4": 100.0, "f=8": 50.0}, pixel_space=["f=1"])
    assert plan.remaining_s(0.0, {}) == 50 + 100 + 100 + 50 + 4 * 120  # nothing finished: the prior overhead
    plan.factors["f=1"].started, plan.factors["f=1"].finished = 0.0, 450.0  # 400 s outside training
    assert plan.remaining_s(450.0, {}) == 100 + 100 + 50 + 3 * 120  # pixel space's is no guide to latents
    plan.factors["f=2"].started, plan.factors["f=2"].finished = 450.0, 850.0  # 300 s
    assert plan.remaining_s(850.0, {}) == 100 + 50 + 2 * 300
    plan.factors["f=4"].started, plan.factors["f=4"].finished = 850.0, 1150.0  # then only 200 s
    assert plan.remaining_s(1150.0, {}) == 50 + 200
    plan.factors["f=8"].started = 1150.0
    assert plan.remaining_s(1250.0, {}) == 150  # 100 s into its expected 250
    assert plan.remaining_s(1550.0, {"f=8": 30.0}) == 30  # overdue, but 30 s of its budget are left
    assert SweepPlan({"f=4": 100.0, "f=8": 100.0}, workers=2).remaining_s(0.0, {}) == 220


def test_a_step_budget_is_expected_to_take_as_long_as_the_latest_finished_factor_did():
    plan = SweepPlan({"f=4": None, "f=8": None, "f=16": None})
    plan.factors["f=4"].started, plan.factors["f=4"].finished = 0.0, 90.0
    assert plan.remaining_s(90.0, {}) == 180
    plan.keep(["f=16"])  # a resumed sweep: only f=16 is left
    assert list(plan.factors) == ["f=16"] and plan.label("f=16") == "f=16 (1/1)"


def test_a_log_file_gets_a_status_line_with_factor_phase_and_eta_while_training(monkeypatch, caplog):
    monkeypatch.setattr(progress, "TICK_S", 0.2)
    reporter = Reporter()
    caplog.set_level(logging.INFO, logger="latentlab")
    plan = SweepPlan({"f=4": 60.0, "f=8": 60.0})
    with reporter.sweep_plan(plan), reporter.factor("f=8"), reporter.phase("LDM training"):
        reporter.training(Training(fraction=0.5, step=120, loss=0.071, img_per_s=180.0, remaining_s=30.0))
        time.sleep(2.5)
    lines = [r.getMessage() for r in caplog.records if r.name == "latentlab"]
    assert lines[0].startswith("f=8 (2/2) LDM training started; sweep ETA ")
    status = [line for line in lines if "step 120" in line]
    assert len(status) >= 2, lines  # repeated while the phase runs, not only once
    assert "f=8 (2/2) LDM training: step 120, loss 0.071, 180 img/s, 0:30 of budget left; sweep ETA" in status[0]
    assert lines[-1].startswith("f=8 (2/2) LDM training done in 0:0")

    with pytest.raises(RuntimeError), reporter.phase("evaluation"):
        raise RuntimeError("a phase that fails")
    assert caplog.records[-1].getMessage().startswith("evaluation stopped after 0:00")  # not "done"


@pytest.mark.parametrize(
    ("flag", "shown", "hidden"),
    [
        ("-q", [], ["latentlab - data started", "Finished in state"]),
        ("-v", ["latentlab - data started", "Finished in state"], []),
        # (the default, our lines without Prefect's: the two-sweeps test reads a sweep's log)
    ],
)
def test_verbosity_decides_what_reaches_the_console(project, repo, cli, flag, shown, hidden):
    args = ["data", "--params", str(repo / "params/smoke.yaml"), "--set", "data.max_per_class=2"]
    done = cli(project, *args, *([flag] if flag else []))
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(text in done.stderr for text in shown), done.stderr
    assert not any(text in done.stderr for text in hidden), done.stderr
    assert "Data version" in done.stdout + done.stderr and done.stdout.strip()  # the result, always
