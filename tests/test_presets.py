"""Presets layer on params/default.yaml (or on what they name in ``extends``), every key says
what it means, and ``latentlab params`` prints each value with its origin."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from components.errors import UserError
from components.params import Params, field_descriptions
from components.presets import SCHEMA, SET, load_params, resolve


def preset(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_one_key_preset_changes_that_key_and_keeps_the_defaults(tmp_path, repo, monkeypatch):
    monkeypatch.chdir(repo)
    default = load_params(repo / "params/default.yaml")
    mine = load_params(preset(tmp_path / "mine.yaml", "ldm:\n  lr: 2.0e-4\n"))
    assert mine.ldm.lr == 2e-4 != default.ldm.lr
    assert (
        mine.model_dump()
        == default.model_copy(update={"ldm": default.ldm.model_copy(update={"lr": 2e-4})}).model_dump()
    )
    assert default.eval.samples != Params().eval.samples, "the defaults differ from the schema's, so this tells"


def test_extends_names_the_base_relative_to_the_preset_or_none(tmp_path, repo, monkeypatch):
    monkeypatch.chdir(repo)
    base = preset(tmp_path / "base.yaml", "extends: none\neval:\n  samples: 99\n")
    (tmp_path / "sub").mkdir()
    child = preset(tmp_path / "sub/child.yaml", "extends: ../base.yaml\nseed: 3\n")
    params = load_params(child)
    assert (params.seed, params.eval.samples, params.ae.max_steps) == (3, 99, Params().ae.max_steps)
    origin = resolve(child, ["ae.factor=4"]).origin
    assert origin["seed"] == str(child) and origin["eval.samples"] == str(base)
    assert origin["ae.factor"] == SET and origin["ae.lr"] == SCHEMA


def test_smoke_layers_on_the_default_preset(repo, monkeypatch):
    monkeypatch.chdir(repo)
    origin = resolve(repo / "params/smoke.yaml").origin
    assert origin["ae.max_steps"].endswith("smoke.yaml") and origin["sweep.ae_minutes"].endswith("default.yaml")


def test_a_loop_or_a_missing_base_is_refused_by_name(tmp_path):
    preset(tmp_path / "a.yaml", "extends: b.yaml\n")
    preset(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(UserError, match="extends itself"):
        load_params(tmp_path / "a.yaml")
    with pytest.raises(UserError, match=r"gone\.yaml does not exist"):
        load_params(preset(tmp_path / "c.yaml", "extends: gone.yaml\n"))


def test_every_key_says_what_it_means():
    meanings = field_descriptions()
    assert set(meanings) == set(Params().flat())
    assert [key for key, text in meanings.items() if not text.strip()] == []


def test_the_params_command_prints_each_value_its_origin_and_meaning(tmp_path, repo, cli):
    mine = preset(tmp_path / "mine.yaml", "ldm:\n  lr: 2.0e-4\n")
    done = cli(tmp_path, "params", "--params", str(mine), "--set", "ae.factor=4")
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines()}
    assert set(rows) == set(Params().flat())
    assert rows["ldm.lr"].split()[1:3] == ["0.0002", str(mine)]
    assert rows["ae.factor"].split()[1:3] == ["4", "--set"] and "downsampling factor" in rows["ae.factor"]
    assert rows["eval.samples"].split()[2] == str(repo / "params/default.yaml")  # (outside a checkout)
    assert not (tmp_path / "mlflow.db").exists(), "printing parameters opens no tracking store"


def test_docs_parameters_is_what_the_params_command_prints(repo, cli):
    done = cli(repo, "params", "--markdown")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (repo / "docs/parameters.md").read_text(), (
        "docs/parameters.md is stale: run `latentlab params --markdown > docs/parameters.md`"
    )


def test_version_is_the_installed_packages(repo, cli):
    from importlib.metadata import version

    done = cli(repo, "--version")
    assert done.returncode == 0 and done.stdout.strip() == f"latentlab {version('latentlab')}"


GPU_AT_TINY_SIZE = [  # params/gpu.yaml's shapes (levels, blocks, attention, losses) at widths and sizes a CPU trains in seconds
    "ae.accelerator=auto",
    "ldm.accelerator=auto",
    "data.resolution=32",
    "data.max_per_class=6",
    "data.val_fraction=0.3",
    "ae.factor=4",
    "ae.base_channels=8",
    "ae.batch_size=4",
    "ae.max_steps=2",
    "ae.max_minutes=null",
    "ae.checkpoint_every=1",
    "ae.image_every=2",
    "ldm.widths=[16, 16, 32, 32]",
    "ldm.batch_size=4",
    "ldm.max_steps=2",
    "ldm.max_minutes=null",
    "ldm.checkpoint_every=1",
    "ldm.image_every=2",
    "ldm.sample_steps=2",
    "ldm.samples_per_class=1",
    "ldm.budget_samples=8",
    "ldm.budget_sample_steps=2",
    "eval.extractor_steps=20",
]


def test_the_gpu_preset_trains_on_a_cpu_at_tiny_size(project, repo, cli):
    gpu = str(repo / "params/gpu.yaml")
    refused = cli(project, "train-ldm", "--params", gpu)  # no GPU here: said at once, before any work
    message = " ".join(refused.stderr.split())
    assert refused.returncode == 2 and "ae.accelerator=cuda, but this machine has no CUDA GPU" in message
    assert "--set ae.accelerator=auto" in message and not (project / "data").exists()

    overrides = [word for setting in GPU_AT_TINY_SIZE for word in ("--set", setting)]
    done = cli(project, "train-ldm", "--params", gpu, *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    run = client.get_run(done.stdout.split()[-1])
    ae = client.get_run(run.data.tags["latentlab.ae_run_id"])
    assert run.data.params["ldm.layers_per_block"] == "2" and run.data.params["ldm.attention_max_size"] == "32"
    assert run.data.params["ldm.ema_decay"] == "0.9999" and run.data.tags["latentlab.latent_shape"].endswith("8x8")
    assert ae.data.params["ae.pixel_loss"] == "l1" and ae.data.params["ae.layers_per_block"] == "2"
    assert run.data.metrics["steps"] == 2 and ae.data.metrics["steps"] == 2
