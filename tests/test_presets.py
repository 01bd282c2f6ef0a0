"""Presets layer on params/default.yaml (or on what they name in ``extends``), every key says
what it means, and ``latentlab params`` prints each value with its origin."""

from __future__ import annotations

from pathlib import Path

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
