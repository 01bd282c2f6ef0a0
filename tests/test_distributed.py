"""Training on two CPU processes (DDP over gloo): one run, metrics logged once, the same weights
and EMA in every process, checkpoints that resume."""

from __future__ import annotations

import os
import signal
import threading
import time

import mlflow
import psutil
import pytest
import torch

from components import distributed
from components.conditioning import Conditioner
from components.diffusion import LatentDiffusionModule
from components.errors import UserError
from components.ldm_training import train_ldm
from components.params import LDMParams
from components.training import LAST, check_trainable
from flows.pipeline import ldm_flow


def test_two_processes_train_resume_and_keep_one_ema(tmp_path):
    ldm = LDMParams(widths=[16, 32], batch_size=4, max_steps=4, checkpoint_every=2, image_every=100, devices=2)
    latents, cond = torch.randn(16, 3, 4, 4), torch.randint(0, 2, (16,))

    def fresh():
        return LatentDiffusionModule(ldm.model_dump(mode="json"), 3, 4, 2, Conditioner("class", 2, 8))

    first = train_ldm(fresh(), ldm, latents, cond, checkpoint_dir=tmp_path, seed=0)
    assert int(first.steps) == 4 and first.ema.optimization_step == 4
    assert not torch.distributed.is_initialized()  # the next training may start its own group
    assert not (tmp_path / "ranks").exists()  # the other process's folder, gone once it finished

    longer = ldm.model_copy(update={"max_steps": 6})
    resumed = train_ldm(fresh(), longer, latents, cond, checkpoint_dir=tmp_path, seed=0)
    assert int(resumed.steps) == 6 and resumed.ema.optimization_step == 6  # both processes resumed
    saved = torch.load(tmp_path / LAST, weights_only=True)
    assert int(saved["state_dict"]["steps"]) == 6 and saved["ema"]["optimization_step"] == 6
    # The EMA moved away from the weights it averages (it is an average, not a copy).
    with resumed.ema_weights():
        averaged = [p.detach().clone() for p in resumed.unet.parameters()]
    assert any(not torch.equal(a, p) for a, p in zip(averaged, resumed.unet.parameters(), strict=True))


def test_a_process_that_cannot_start_fails_the_training_at_once_with_its_output(tmp_path):
    started = time.monotonic()
    failed = r"Training process 1 stopped \(exit code 1\)(.|\n)*ModuleNotFoundError"
    with (
        pytest.raises(UserError, match=failed),
        distributed.ranks(2, tmp_path / "ranks", "components.no_such_module:train_rank", {}, {}),
    ):
        pytest.fail("rank 0 must not start training without the other process")
    assert time.monotonic() - started < 60  # not DDP's 30-minute rendezvous timeout
    assert "LOCAL_RANK" not in os.environ


@pytest.mark.parametrize("blow", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_a_process_killed_or_stopped_while_training_fails_the_training_within_a_minute(tmp_path, blow):
    """A killed rank closes its connections; a stopped one keeps them open, and rank 0 waited for
    gloo's 30-minute timeout. Either way the training fails within a minute, naming the rank."""
    ldm = LDMParams(
        widths=[16, 32], batch_size=4, max_steps=10**6, checkpoint_every=10**6, image_every=10**6, devices=2
    )
    latents, cond = torch.randn(16, 3, 4, 4), torch.randint(0, 2, (16,))
    module = LatentDiffusionModule(ldm.model_dump(mode="json"), 3, 4, 2, Conditioner("class", 2, 8))
    struck: dict[str, float] = {}

    def strike() -> None:  # once the other process trains, as a crash or Ctrl-Z in its terminal would
        deadline = time.monotonic() + 300
        while not (tmp_path / "ranks" / "ready1").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(5)
        (helper,) = [p for p in psutil.Process().children() if "components.distributed" in p.cmdline()]
        helper.send_signal(blow)
        struck["at"] = time.monotonic()

    threading.Thread(target=strike, daemon=True).start()
    how = (
        "was killed \\(SIGKILL\\)"
        if blow == signal.SIGKILL
        else "was stopped \\(SIGSTOP or frozen\\) for 30 s and was ended"
    )
    with pytest.raises(UserError, match=f"Training process 1 {how}; its last lines:"):
        train_ldm(module, ldm, latents, cond, checkpoint_dir=tmp_path, seed=0)
    assert time.monotonic() - struck["at"] < 60
    assert not [p for p in psutil.Process().children() if "components.distributed" in p.cmdline()]
    assert not torch.distributed.is_initialized()


def test_each_process_needs_a_whole_batch():
    ldm = LDMParams(batch_size=8, devices=2)
    check_trainable(16, ldm, "ldm")
    with pytest.raises(UserError, match=r"fewer than ldm.batch_size=8 per process \(ldm.devices=2\).*batch_size=7"):
        check_trainable(15, ldm, "ldm")


@pytest.mark.slow
def test_the_stages_train_on_two_processes_into_one_run_each_logging_once(project, ldm_smoke, smoke_params):
    params = smoke_params(*ldm_smoke, "ae.devices=2", "ldm.devices=2")
    result = ldm_flow(params)
    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(experiment_names=["latentlab"], output_format="list")
    by_stage = sorted(r.data.tags["latentlab.stage"] for r in runs)
    assert by_stage.count("autoencoder") == 1 and by_stage.count("ldm") == 1
    for run_id, name, section in (
        (result.tags["latentlab.ae_run_id"], "ae", params.ae),
        (result.run_id, "ldm", params.ldm),
    ):
        run = mlflow.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params[f"{name}.devices"] == "2"
        steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
        every = section.log_every
        assert steps == list(range(every, section.max_steps + 1, every))  # once per step: rank 0 alone reports
        assert run.data.metrics["steps"] == section.max_steps
        assert run.data.metrics["images_seen"] == section.max_steps * section.batch_size * 2
    assert {v.name for v in client.search_model_versions()} == {"autoencoder-f4-kl", "ldm"}
