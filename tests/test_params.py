from pathlib import Path

import pytest

from components.errors import UserError
from components.params import UNLIMITED_STEPS, Params, params_from_run
from components.presets import load_params


@pytest.mark.parametrize("preset", ["default.yaml", "smoke.yaml"])
def test_presets_are_valid(repo, preset):
    params = load_params(repo / "params" / preset)
    assert params.data.source == "openmoji"
    assert params.ae.factor <= params.data.resolution


def test_overrides_are_read_as_yaml(repo):
    params = load_params(
        repo / "params/default.yaml",
        ["ae.factor=4", "data.strict=true", "ldm.lr=2e-4", "data.source=folder", "data.path=/tmp/x"],
    )
    assert params.ae.factor == 4 and params.data.strict is True
    assert params.ldm.lr == pytest.approx(2e-4)
    assert params.data.path == Path("/tmp/x")


def test_flat_uses_dotted_names():
    flat = Params().flat()
    assert flat["ae.factor"] == 8 and flat["data.resolution"] == 64


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("ae.factor=3", "ae.factor"),
        ("ae.factor=64", "ae.factor"),
        ("ae.factor=eight", "ae.factor"),
        ("ldm.lr=-0.1", "ldm.lr"),
        ("data.source=imagenet", "data.source"),
        ("data.resolution=48", "data.resolution"),
        ("data.resolutoin=64", "data.resolutoin"),
        ("nonsense.key=1", "nonsense"),
        ("data.source=folder", "data.path"),
        ("ldm.widths=[48, 100]", "multiple of 32"),
        ("ldm.widths=[]", "ldm.widths"),
        ("ldm.sample_steps=2000", "exceeds timesteps=1000"),
        ("eval.ddim_steps=[0, 10]", "eval.ddim_steps"),
        ("eval.sample_steps=5000", "eval.sample_steps"),
        ("ldm.lr=1.0e+400", "ldm.lr"),  # infinity
        ("ae.kl_weight=.nan", "ae.kl_weight"),
        ("ldm.beta_end=1.5", "ldm.beta_end"),
        ("ldm.beta_start=0.05", "beta_start=0.05 must be below"),
        ("seed=4294967296", "seed"),  # 32-bit: would fail only once training starts
        ("seed=-1", "seed"),
        ("seed=4294967295", "sweep.seeds"),  # the default's second seed overflows
        ("ae.devices=1000", "ae.devices"),
        ("ae.base_channels=100000", "ae.base_channels"),
        ("ldm.timesteps=10000000", "ldm.timesteps"),
        ("eval.bootstrap_rounds=100000000", "eval.bootstrap_rounds"),
    ],
)
def test_invalid_values_name_the_key(repo, override, named):
    with pytest.raises(UserError) as caught:
        load_params(repo / "params/default.yaml", [override])
    assert named in str(caught.value)


def test_an_error_names_a_long_value_without_printing_it_whole(repo):
    with pytest.raises(UserError) as caught:
        load_params(repo / "params/default.yaml", ["ldm.widths=[" + ", ".join(["48"] * 5000) + "]"])
    assert "ldm.widths" in str(caught.value) and len(str(caught.value)) < 1000


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("ae:\n  factor: 4\n  factor: 16\n", "'factor' appears twice"),
        ("ae:\n  factor: 4\nae:\n  lr: 1.0\n", "'ae' appears twice"),
        ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nae: [*b, *b]\n", "alias *a"),
    ],
)
def test_duplicate_keys_and_aliases_are_refused_by_line(tmp_path, text, named):
    """PyYAML keeps the last of two keys silently, and nested aliases expand without bound once
    the tree is walked (a billion laughs in a few hundred bytes): neither reaches a run."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(UserError, match="not valid YAML") as caught:
        load_params(bad)
    assert named in str(caught.value) and "line" in str(caught.value)


@pytest.mark.parametrize(
    ("override", "named"), [("ae={factor: 4, factor: 8}", "appears twice"), ("ae.channel_mult=[&a 1, *a]", "alias")]
)
def test_set_values_refuse_duplicate_keys_and_aliases_too(override, named):
    with pytest.raises(UserError, match=named):
        load_params(None, [override])


def test_factor_larger_than_image_is_refused():
    with pytest.raises(UserError, match="larger than data.resolution"):
        load_params(None, ["data.resolution=16", "ae.factor=32"])


@pytest.mark.parametrize(
    "override", ["ae.factor", "=3", "ae.factor.deeper=1", "ae.channel_mult=[1, 2", "data.path=a: b"]
)
def test_malformed_set_is_refused(override):
    with pytest.raises(UserError):
        load_params(None, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="mapping"):
        load_params(bad)
    bad.write_bytes("ae:\n  regularizer: kl # caf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_params(bad)
    bad.write_text("ae:\n  factor: 4\n", encoding="utf-8-sig")  # a BOM, as some editors write
    assert load_params(bad).ae.factor == 4


def test_cli_rejects_bad_factor_without_traceback(tmp_path, repo, cli):
    done = cli(tmp_path, "data", "--params", str(repo / "params/default.yaml"), "--set", "ae.factor=3")
    assert done.returncode == 2
    assert "ae.factor" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "data").exists()


def test_sweep_budget_gives_every_factor_the_same_steps_or_the_same_time(repo):
    sweep = ["sweep.ae_minutes=2", "sweep.ldm_minutes=4.5", "sweep.ae_steps=30", "sweep.ldm_steps=70"]
    timed = load_params(repo / "params/default.yaml", [*sweep, "sweep.budget=time"])
    per_factor = timed.for_factor(16)
    assert per_factor.ae.factor == 16 and (per_factor.ae.max_minutes, per_factor.ldm.max_minutes) == (2, 4.5)
    assert per_factor.ae.max_steps == per_factor.ldm.max_steps == UNLIMITED_STEPS
    assert timed.ae.max_minutes != 2, "a single run keeps its own budget"
    assert timed.budget_description() == "equal wall time: ae 2 min, ldm 4.5 min per factor"
    stepped = load_params(repo / "params/default.yaml", [*sweep, "sweep.budget=steps"]).for_factor(4)
    assert stepped.ae.max_minutes is None and stepped.ldm.max_minutes is None
    assert (stepped.ae.max_steps, stepped.ldm.max_steps) == (30, 70)


def test_sweep_settings_are_checked_before_any_work():
    with pytest.raises(UserError, match="sweep.factors"):
        load_params(None, ["sweep.factors=[3, 8]"])
    with pytest.raises(UserError, match="For f=32 in sweep.factors"):
        load_params(None, ["data.resolution=16"]).for_factor(32)
    with pytest.raises(UserError, match="sweep.ldm_minutes"):
        load_params(None, ["sweep.ldm_minutes=0"])


def test_params_come_back_from_a_runs_flattened_strings(repo):
    original = load_params(repo / "params/smoke.yaml", ["ae.latent_channels=4", "data.remote_endpoint=http://x:9"])
    logged = {key: str(value) for key, value in original.flat().items()}
    keep = load_params(None, ["eval.samples=9"])
    restored = params_from_run(logged, keep=keep, sections=("eval",))
    assert restored.model_dump(exclude={"eval"}) == original.model_dump(exclude={"eval"})
    assert restored.eval.samples == 9

    del logged["data.resolution"]  # a run whose data parameters were not all logged
    assert params_from_run(logged, keep=keep, sections=("eval",)).data.resolution == 64  # a default ...
    with pytest.raises(UserError, match=r"did not record data.resolution .*latentlab reproduce"):
        params_from_run(logged, keep=keep, sections=("eval",), complete=("data",))  # ... or refused


def test_auto_reference_split_avoids_the_images_the_domain_extractor_trained_on(monkeypatch):
    from components.evaluation import reference_split

    monkeypatch.delenv("LATENTLAB_INCEPTION_WEIGHTS", raising=False)
    assert reference_split(load_params().eval) == "val"
    assert reference_split(load_params(None, ["eval.extractor=inception"]).eval) == "train"  # as the paper
    assert reference_split(load_params(None, ["eval.reference_split=train"]).eval) == "train"
