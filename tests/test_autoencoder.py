"""The first stage: shapes per factor, the loss, learning, and the train-ae flow end to end."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from components.autoencoder_training import AutoencoderModule
from components.first_stage import build_first_stage, load_first_stage
from components.losses import AutoencoderLoss, PerceptualLoss
from components.metrics import codebook_usage
from components.params import AEParams
from components.precision import decide
from flows.pipeline import autoencoder_flow

TINY = dict(base_channels=8, channel_mult=[1, 1, 2, 2, 2, 2], attention=False)


def tiny_stage(factor: int, regularizer: str = "kl", resolution: int = 32):
    return build_first_stage(AEParams(factor=factor, regularizer=regularizer, **TINY), resolution)


@pytest.mark.parametrize("factor", [2, 4, 8, 16])
@pytest.mark.parametrize("regularizer", ["kl", "vq"])
def test_latent_shape_follows_factor(factor, regularizer):
    stage = tiny_stage(factor, regularizer)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = stage.encode(x)
    assert z.shape == (2, *stage.latent_shape(32)) == (2, stage.latent_channels, 32 // factor, 32 // factor)
    assert stage.factor == factor
    assert stage.decode(z).shape == x.shape
    out = stage.reconstruct(x)
    assert out.image.shape == x.shape and out.regularization.ndim == 0
    assert (out.codes is not None) == (regularizer == "vq")


def test_latent_channels_follow_the_reference_configs_of_each_regularizer():
    assert [tiny_stage(f, "kl", resolution=64).latent_channels for f in (4, 8, 16, 32)] == [3, 4, 16, 64]
    assert [tiny_stage(f, "vq", resolution=64).latent_channels for f in (4, 8, 16, 32)] == [3, 4, 8, 16]


def test_kl_is_normalised_like_the_reconstruction_loss_as_compvis_does():
    """CompVis: loss = sum over pixels of |x - x'| / B + w * sum over latents of KL / B. Per pixel
    value (what L1's mean is), the KL term is that sum divided by B * C * H * W."""
    stage = tiny_stage(4, resolution=16)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    out = stage.reconstruct(x)
    kl_per_image = stage.net.encode(x).latent_dist.kl().sum() / 3  # CompVis's kl_loss
    assert float(out.regularization) == pytest.approx(float(kl_per_image) / (3 * 16 * 16), rel=1e-5)


def test_group_norm_keeps_at_least_four_channels_per_group():
    from components.first_stage import norm_groups

    assert [norm_groups(w, 4) for w in (8, 16, 64, 128, 256)] == [2, 4, 16, 32, 32]
    groups = {m.num_groups for m in tiny_stage(8).modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {2}  # TINY's base width 8


def test_pixel_space_is_identity():
    stage = tiny_stage(1)
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert not stage.trainable and stage.latent_shape(8) == (3, 8, 8) and stage.fit_scale(x) == 1.0
    assert torch.equal(stage.decode_latents(stage.encode_images(x)), x)


def test_latent_scale_gives_unit_variance_and_is_saved_with_the_model(tmp_path):
    stage = tiny_stage(4, resolution=16)
    images = torch.randint(0, 256, (80, 3, 16, 16), dtype=torch.uint8)
    scale = stage.fit_scale(images)
    assert stage.encode_images(images[:64]).std() == pytest.approx(1.0, rel=1e-4)
    stage.save_pretrained(tmp_path)
    loaded = load_first_stage(tmp_path)
    assert (loaded.factor, loaded.regularizer, loaded.scale) == (4, "kl", scale)
    assert torch.equal(loaded.encode_images(images), stage.encode_images(images))


def test_codebook_usage_and_perplexity():
    usage = codebook_usage(torch.tensor([0, 1, 2, 3] * 10), codebook_size=8)
    assert usage["codebook_usage"] == pytest.approx(0.5)
    assert usage["codebook_perplexity"] == pytest.approx(4.0)


def test_discriminator_joins_at_disc_start_with_adaptive_weight():
    stage = tiny_stage(4, resolution=16)
    loss = AutoencoderLoss(regularization_weight=1e-6, perceptual=PerceptualLoss("ssim"), disc_start=5, disc_layers=2)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    out = stage.reconstruct(x)
    _, before = loss.generator_loss(x, out.image, out.regularization, 4, stage.last_layer)
    _, after = loss.generator_loss(x, out.image, out.regularization, 5, stage.last_layer)
    assert "g_loss" not in before and "g_loss" in after
    assert after["d_weight"] > 0


@pytest.mark.parametrize("pixel_loss", ["l1", "l2"])
def test_pixel_loss_is_the_mean_absolute_or_squared_error(pixel_loss):
    loss = AutoencoderLoss(
        regularization_weight=0.0,
        perceptual=PerceptualLoss("ssim"),
        perceptual_weight=0.0,
        pixel_loss=pixel_loss,
        disc_weight=0.0,
    )
    x, recon = torch.zeros(2, 3, 16, 16), torch.full((2, 3, 16, 16), 0.5)
    total, logs = loss.generator_loss(x, recon, torch.tensor(0.0), 0, torch.zeros(1))
    expected = 0.5 if pixel_loss == "l1" else 0.25
    assert float(total) == pytest.approx(expected) and float(logs[pixel_loss]) == pytest.approx(expected)


def test_offline_perceptual_term_is_ssim_based():
    perceptual = PerceptualLoss("auto", vgg_path="/nonexistent/vgg.pth")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert perceptual.name == "ssim"
    assert perceptual(x, x) == pytest.approx(0.0, abs=1e-5)
    assert perceptual(-x, x) > 0.5


class RunsCode:
    """A pickle that runs code when it is loaded in full (what ``weights_only=True`` refuses)."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_named_vgg_weights_are_never_unpickled_in_full(tmp_path, monkeypatch):
    from components.errors import UserError
    from components.losses import VGG16_FILE, _install_in_hub_cache

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    evil = tmp_path / "evil.pth"
    torch.save({"features.0.weight": RunsCode()}, evil)
    with pytest.raises(UserError, match="not a plain weights file"):
        _install_in_hub_cache(evil)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "hub").exists()
    plain = tmp_path / "vgg.pth"
    torch.save({"features.0.weight": torch.ones(2)}, plain)
    _install_in_hub_cache(plain)
    cached = tmp_path / "hub" / "checkpoints" / VGG16_FILE
    assert not cached.is_symlink() and cached.read_bytes() == plain.read_bytes()  # a checked copy
    torch.save({"features.0.weight": RunsCode()}, cached)  # planted in the hub cache, where auto finds it
    with pytest.raises(UserError, match="not a plain weights file"):
        PerceptualLoss("auto")
    assert not (tmp_path / "pwned").exists()


def test_training_reduces_reconstruction_error():
    torch.manual_seed(0)
    ae = AEParams(factor=4, disc_start=10_000, lr=2e-3, **TINY)
    module = AutoencoderModule(ae.model_dump(mode="json"), 16)
    images = torch.full((8, 3, 16, 16), 230, dtype=torch.uint8)  # flat colour + a dark square
    for i in range(8):
        images[i, i % 3, 2 + i : 8 + i, 3:11] = 20
    optimizers = module.configure_optimizers()
    module.optimizers = lambda: optimizers
    module.manual_backward = lambda loss: loss.backward()
    module.log = lambda *a, **k: None

    def error():
        return (module.reconstruct_uint8(images).float() - images.float()).abs().mean()

    before = error()
    for _ in range(60):
        module.training_step((images,), 0)
    assert error() < 0.5 * before


# --- the flow, end to end ---------------------------------------------------------------------


def ae_runs():
    return mlflow.search_runs(
        experiment_names=["latentlab"],
        filter_string="tags.`latentlab.stage` = 'autoencoder'",
        output_format="list",
    )


@pytest.mark.slow
def test_train_ae_records_registers_and_reuses(project, ae_smoke, smoke_params, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")  # (default 10 s; this run: 1 s)
    params = smoke_params(*ae_smoke)
    result = autoencoder_flow(params)
    run = mlflow.get_run(result.autoencoder_run)
    assert run.info.status == "FINISHED"
    assert "system/cpu_utilization_percentage" in run.data.metrics  # beside the loss, over time
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [run.data.tags["latentlab.data_version"]]
    assert {"psnr", "ssim", "rfid", "train_loss", "train_img_per_s"} <= set(run.data.metrics)
    assert run.data.tags["latentlab.factor"] == "4"
    assert run.data.tags["latentlab.perceptual"] == "ssim"
    assert run.data.tags["latentlab.fid_extractor"].startswith("latentlab-cnn")
    assert run.data.params["ae.factor"] == "4" and "ldm.lr" not in run.data.params
    assert run.info.run_name == "ae-f4-kl"

    client = mlflow.MlflowClient()
    (version,) = client.search_model_versions("name = 'autoencoder-f4-kl'")
    assert version.run_id == result.autoencoder_run
    assert version.tags["latentlab.data_version"] == run.data.tags["latentlab.data_version"]
    tags = mlflow.get_run(result.autoencoder_run).data.tags
    assert tags["latentlab.seed"] == "0" and tags["latentlab.precision"] == decide("auto", "autoencoder").value

    # The exported weights are the trained model: same reconstructions without latentlab's module.
    weights = load_file(
        mlflow.artifacts.download_artifacts(
            run_id=result.autoencoder_run, artifact_path="weights/autoencoder.safetensors"
        )
    )
    stage = load_first_stage(
        mlflow.artifacts.download_artifacts(run_id=result.autoencoder_run, artifact_path="diffusers")
    )
    assert (stage.factor, stage.regularizer) == (4, "kl")
    assert stage.scale == mlflow.get_run(result.autoencoder_run).data.metrics["latent_scale_factor"] != 1.0
    assert set(weights) == set(stage.state_dict())
    assert all(torch.equal(weights[k], v) for k, v in stage.state_dict().items())
    artifacts = {a.path for a in client.list_artifacts(result.autoencoder_run)}
    assert {"reconstructions_final.png", "weights", "diffusers"} <= artifacts
    assert client.get_metric_history(result.autoencoder_run, "train_loss")[-1].step == 6

    started = time.perf_counter()
    again = autoencoder_flow(params)
    assert again.autoencoder_run == result.autoencoder_run and again.reused
    assert time.perf_counter() - started < 30

    changed = autoencoder_flow(smoke_params(*ae_smoke, "ae.lr=1e-3"))
    assert changed.autoencoder_run != result.autoencoder_run and not changed.reused
    assert len(ae_runs()) == 2
    assert len(client.search_model_versions("name = 'autoencoder-f4-kl'")) == 2


@pytest.mark.slow
def test_vq_reports_codebook_usage(project, ae_smoke, smoke_params):
    params = smoke_params(*ae_smoke, "ae.regularizer=vq", "ae.codebook_size=32")
    result = autoencoder_flow(params)
    metrics = mlflow.get_run(result.autoencoder_run).data.metrics
    assert 0 < metrics["codebook_usage"] <= 1 and metrics["codebook_perplexity"] >= 1
    assert mlflow.MlflowClient().search_model_versions("name = 'autoencoder-f4-vq'")


@pytest.mark.slow
def test_killed_training_resumes_into_the_same_run_on_another_machine(project, repo, ae_smoke, tmp_path):
    """Killed in one project, rerun in another (no shared files, one MLflow store): the rerun
    fetches the checkpoint the run shared and goes on from it, in the same run."""
    settings = [a for a in ae_smoke if not a.startswith(("ae.max_steps", "ae.checkpoint_every", "data.resolution"))]
    settings += ["data.resolution=32", "ae.max_steps=30", "ae.checkpoint_every=3"]
    command = [
        str(Path(sys.executable).with_name("latentlab")),
        "train-ae",
        "--params",
        str(repo / "params/smoke.yaml"),
    ]
    for setting in settings:
        command += ["--set", setting]
    process = subprocess.Popen(
        command, cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    shared = "mlartifacts/*/artifacts/checkpoint/last.ckpt"
    while not list(project.glob(shared)) and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)  # (a checkpoint written and shared with the run)
    assert process.poll() is None, "training ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    (killed,) = ae_runs()
    assert killed.info.status == "RUNNING"

    client = mlflow.MlflowClient()
    assert [a.path for a in client.list_artifacts(killed.info.run_id, "checkpoint")] == ["checkpoint/last.ckpt"]

    elsewhere = tmp_path / "elsewhere"  # another machine's checkout: its own data/, no .latentlab/
    elsewhere.mkdir()
    for step in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(step, cwd=elsewhere, check=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    done = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "from the checkpoint it shared" in done.stderr
    (finished,) = ae_runs()
    assert finished.info.run_id == killed.info.run_id and finished.info.status == "FINISHED"
    assert len(client.search_model_versions("name = 'autoencoder-f4-kl'")) == 1
    steps = [m.step for m in client.get_metric_history(finished.info.run_id, "train_loss")]
    assert max(steps) == 30
    assert steps.count(2) == 1  # resumed from the checkpoint, not retrained from step 0
    assert client.list_artifacts(finished.info.run_id, "checkpoint") == []  # published: dropped


def test_auto_precision_is_bf16_only_where_the_hardware_has_it_and_it_pays(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for bf16_cpu in ("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz [amx_bf16 avx512_bf16]", "AMD EPYC [avx512_bf16]"):
        assert decide("auto", "autoencoder", processor=bf16_cpu).value == "bf16-mixed"
        assert decide("auto", "ldm", 8, processor=bf16_cpu).value == "32-true"  # measured slower at 8x8 latents
        assert decide("auto", "ldm", 16, processor=bf16_cpu).value == "bf16-mixed"  # and faster at 16x16
        assert decide("32-true", "autoencoder", processor=bf16_cpu).value == "32-true"
    old_cpu = "Intel(R) Xeon(R) CPU E5-2690 v4 @ 2.60GHz [no bf16]"
    assert decide("auto", "autoencoder", processor=old_cpu, cache_dir=tmp_path).value == "32-true"
    assert decide("auto", "ldm", 16, processor=old_cpu, cache_dir=tmp_path).value == "32-true"
