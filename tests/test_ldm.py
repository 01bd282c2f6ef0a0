"""The latent diffusion stage: schedule, UNet shape, conditioning, cache, sampling, the flow."""

import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from components.conditioning import Conditioner, TextEncoder
from components.diffusion import LatentDiffusionModule, build_unet, noise_scheduler, read_config
from components.errors import UserError
from components.first_stage import build_first_stage
from components.latents import cached_latents
from components.params import AEParams, LDMParams
from flows.pipeline import ldm_flow

TINY = LDMParams(widths=[16, 32], batch_size=4, sample_steps=3)


def test_schedule_is_the_papers_linear_schedule():
    betas = noise_scheduler(LDMParams()).betas
    expected = torch.linspace(math.sqrt(0.0015), math.sqrt(0.0195), 1000) ** 2
    assert torch.allclose(betas, expected.to(betas.dtype), atol=1e-7)


@pytest.mark.parametrize(("size", "levels", "attention_blocks"), [(2, 2, 2), (8, 3, 3), (32, 3, 2)])
def test_unet_levels_and_attention_follow_latent_size(size, levels, attention_blocks):
    ldm = LDMParams(widths=[16, 32, 32], attention_max_size=16)
    unet = build_unet(ldm, 4, size, 32)
    assert len(unet.config.block_out_channels) == levels
    assert sum("CrossAttn" in b for b in unet.config.down_block_types) == attention_blocks
    x = torch.randn(2, 4, size, size)
    assert unet(x, torch.tensor([1, 500]), encoder_hidden_states=torch.randn(2, 1, 32)).sample.shape == x.shape


def test_conditioner_modes_and_null_row():
    cls = Conditioner("class", num_classes=3, dim=8)
    assert cls(torch.tensor([0, 2, 3])).shape == (3, 1, 8) and cls.null == 3
    none = Conditioner("none", num_classes=3, dim=8)
    assert torch.equal(none(torch.tensor([0, 1])), none(torch.tensor([0, 0])))


def test_text_encoder_works_offline_and_distinguishes_captions():
    encoder = TextEncoder(max_tokens=8)
    states = encoder(["grinning face", "red apple", "grinning face"])
    assert states.shape == (3, 8, 384)
    assert torch.allclose(states[0], states[2]) and not torch.allclose(states[0], states[1])


def test_latent_cache_holds_the_scaled_latents_and_is_reused(tmp_path):
    ae = AEParams(factor=4, base_channels=8, channel_mult=[1, 1, 2], attention=False)
    stage = build_first_stage(ae, 16)
    images = {
        "train": (torch.rand(70, 3, 16, 16) * 255).to(torch.uint8),
        "val": torch.zeros(4, 3, 16, 16, dtype=torch.uint8),
    }
    stage.fit_scale(images["train"])
    latents = cached_latents(tmp_path / "z.safetensors", stage, images)
    assert latents["train"].shape == (70, *stage.latent_shape(16)) == (70, 3, 4, 4)
    assert latents["train"][:64].std() == pytest.approx(1.0, rel=1e-3)

    def refuse(_):
        raise AssertionError("encoded again instead of reading the cache")

    stage.encode = refuse
    again = cached_latents(tmp_path / "z.safetensors", stage, images)
    assert torch.equal(again["train"], latents["train"])


def test_bf16_encoding_gives_float32_latents_close_to_fp32_and_leaves_the_stage_nchw(tmp_path):
    stage = build_first_stage(AEParams(factor=4, base_channels=8, channel_mult=[1, 1, 2], attention=False), 16)
    images = {"train": (torch.rand(16, 3, 16, 16) * 255).to(torch.uint8)}
    exact = cached_latents(tmp_path / "fp32.safetensors", stage, images)["train"]
    rounded = cached_latents(tmp_path / "bf16.safetensors", stage, images, bf16=True)["train"]
    assert rounded.dtype == torch.float32 and not torch.equal(rounded, exact)  # bf16 did run
    assert (rounded - exact).abs().max() < 0.05 * exact.abs().max()
    assert all(p.is_contiguous() for p in stage.parameters())


def test_a_damaged_latent_cache_is_encoded_again(tmp_path):
    stage = build_first_stage(AEParams(factor=4, base_channels=8, channel_mult=[1, 1, 2], attention=False), 16)
    images = {"train": (torch.rand(8, 3, 16, 16) * 255).to(torch.uint8)}
    cache = tmp_path / "z.safetensors"
    expected = cached_latents(cache, stage, images)
    cache.write_bytes(cache.read_bytes()[:100])  # truncated, as by a crash mid-write
    assert torch.equal(cached_latents(cache, stage, images)["train"], expected["train"])
    assert torch.equal(load_file(cache)["train"], expected["train"])  # and rewritten whole
    assert [p.name for p in tmp_path.iterdir()] == ["z.safetensors"]  # no temporary left behind


def test_a_latent_cache_holding_nan_is_encoded_again_and_a_nan_encoder_is_refused(tmp_path):
    """Keys and lengths can be right while the values are not: a NaN latent would train a NaN
    denoiser, which would then be evaluated and registered."""
    stage = build_first_stage(AEParams(factor=4, base_channels=8, channel_mult=[1, 1, 2], attention=False), 16)
    images = {"train": (torch.rand(8, 3, 16, 16) * 255).to(torch.uint8)}
    cache = tmp_path / "z.safetensors"
    expected = cached_latents(cache, stage, images)
    poisoned = expected["train"].clone()
    poisoned[3, 0, 0, 0] = float("nan")
    save_file({"train": poisoned}, cache)
    assert torch.equal(cached_latents(cache, stage, images)["train"], expected["train"])
    with torch.no_grad():
        next(stage.parameters()).fill_(float("nan"))  # weights as a diverged training leaves them
    cache.unlink()
    with pytest.raises(UserError, match="NaN or infinite latents: the autoencoder is broken"):
        cached_latents(cache, stage, images)
    assert not cache.exists()


def test_saved_ldm_loads_from_its_directory_alone(tmp_path):
    module = LatentDiffusionModule(TINY.model_dump(mode="json"), 3, 4, 2, Conditioner("class", 2, 8))
    module.ema.step(module.unet.parameters())
    module.save_pretrained(tmp_path / "ldm", autoencoder_run_id="abc")
    assert read_config(tmp_path / "ldm")["autoencoder_run_id"] == "abc"
    loaded = LatentDiffusionModule.from_pretrained(tmp_path / "ldm", Conditioner("class", 2, 8))
    cond = torch.tensor([0, 1])
    expected = module.sample(cond, steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.sample(cond, steps=3, generator=torch.Generator().manual_seed(0)), expected)
    assert torch.equal(loaded.conditioner.table, module.conditioner.table)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_is_seeded_and_shaped(sampler):
    module = LatentDiffusionModule(TINY.model_dump(mode="json"), 3, 4, 2, Conditioner("class", 2, 8))
    cond = torch.tensor([0, 1, 1])
    first = module.sample(cond, sampler=sampler, generator=torch.Generator().manual_seed(1))
    second = module.sample(cond, sampler=sampler, generator=torch.Generator().manual_seed(1))
    assert first.shape == (3, 3, 4, 4) and torch.equal(first, second)
    unguided = module.sample(cond, sampler=sampler, guidance_scale=1.0, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(first, unguided)


def test_denoiser_learns():
    torch.manual_seed(0)
    ldm = LDMParams(widths=[16, 32], lr=3e-3, uncond_prob=0.0)
    module = LatentDiffusionModule(ldm.model_dump(mode="json"), 3, 4, 2, Conditioner("class", 2, 8))
    latents = torch.randn(1, 3, 4, 4).repeat(16, 1, 1, 1)  # one point: noise is predictable
    cond = torch.zeros(16, dtype=torch.long)
    optimizer = module.configure_optimizers()
    torch.manual_seed(1)
    with torch.no_grad():
        before = sum(float(module.loss(latents, cond)) for _ in range(10))
    for _ in range(150):
        optimizer.zero_grad()
        module.loss(latents, cond).backward()
        optimizer.step()
    torch.manual_seed(1)
    with torch.no_grad():
        after = sum(float(module.loss(latents, cond)) for _ in range(10))
    assert after < 0.5 * before


# --- the flow, end to end ---------------------------------------------------------------------


@pytest.mark.slow
def test_train_ldm_records_exports_and_reuses(project, ldm_smoke, smoke_params):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    params = smoke_params(*ldm_smoke)
    result = ldm_flow(params)
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "ldm-f4"
    assert run.data.tags["latentlab.stage"] == "ldm" and run.data.tags["latentlab.factor"] == "4"
    ae_runs = mlflow.search_runs(
        experiment_names=["latentlab"], filter_string="tags.`latentlab.stage` = 'autoencoder'", output_format="list"
    )
    assert [r.info.run_id for r in ae_runs] == [run.data.tags["latentlab.ae_run_id"]]
    assert {"train_loss", "train_img_per_s", "flops_per_step", "latent_scale_factor"} <= set(run.data.metrics)
    assert run.data.params["ldm.conditioning"] == "class"
    assert run.data.tags["latentlab.seed"] == "0" and run.data.tags["latentlab.precision"] in ("32-true", "bf16-mixed")
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id)}
    assert {"samples_final.png", "ldm", "pipeline"} <= artifacts
    grid = Image.open(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="samples_final.png"))
    assert grid.height > 16 * 10  # one row per class

    pipeline_dir = mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="pipeline")
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, text_encoder=None, tokenizer=None)
    contexts = load_file(f"{pipeline_dir}/contexts.safetensors")["contexts"]
    assert pipe.vae.config.scaling_factor == pytest.approx(run.data.metrics["latent_scale_factor"])
    out = pipe(
        prompt_embeds=contexts[:2],
        negative_prompt_embeds=contexts[-1:].expand(2, -1, -1),
        num_inference_steps=3,
        height=16,
        width=16,
        output_type="np",
    )
    assert out.images.shape == (2, 16, 16, 3)

    # Registered: the LDM as a pyfunc from its models:/ URI, and its first stage likewise.
    client = mlflow.MlflowClient()
    (version,) = client.search_model_versions("name = 'ldm'")
    assert version.run_id == result.run_id and version.tags["latentlab.factor"] == "4"
    model = mlflow.pyfunc.load_model(f"models:/ldm/{version.version}")
    labels = json.loads(Path(pipeline_dir, "contexts.json").read_text())["rows"][:2]
    images = model.predict(pd.DataFrame({"label": labels}), params={"steps": 3, "seed": 0})
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    assert np.array_equal(images, model.predict(pd.DataFrame({"label": labels}), params={"steps": 3, "seed": 0}))
    with pytest.raises(ValueError, match="unknown labels"):
        model.predict(pd.DataFrame({"label": ["no such class"]}))
    (ae_version,) = client.search_model_versions("name = 'autoencoder-f4-kl'")
    first_stage = mlflow.pyfunc.load_model(f"models:/autoencoder-f4-kl/{ae_version.version}")
    assert first_stage.predict(images).shape == images.shape
    latent_shape = tuple(int(n) for n in run.data.tags["latentlab.latent_shape"].split("x"))
    assert first_stage.predict(images, params={"output": "latents"}).shape[1:] == latent_shape

    again = ldm_flow(params)
    assert again.run_id == result.run_id and again.reused


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["text", "none"])
def test_text_and_unconditional_modes(project, ldm_smoke, smoke_params, mode):
    params = smoke_params(*ldm_smoke, f"ldm.conditioning={mode}", "ldm.max_steps=3")
    result = ldm_flow(params)
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["ldm.conditioning"] == mode
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "pipeline")}
    assert ("pipeline/text_encoder" in files) == (mode == "text")


@pytest.mark.slow
def test_pixel_space_ldm(project, ldm_smoke, smoke_params):
    params = smoke_params(*ldm_smoke, "ae.factor=1", "ldm.max_steps=3")
    result = ldm_flow(params)
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["latentlab.factor"] == "1"
    assert run.data.metrics["latent_scale_factor"] == 1.0


def test_ldm_checkpoint_resumes_with_ema(project):
    from components.ldm_training import train_ldm

    ldm = TINY.model_copy(update={"max_steps": 4, "checkpoint_every": 2, "log_every": 2, "image_every": 100})
    latents, cond = torch.randn(16, 3, 4, 4), torch.randint(0, 2, (16,))

    def fresh():
        return LatentDiffusionModule(ldm.model_dump(mode="json"), 3, 4, 2, Conditioner("class", 2, 8))

    first = train_ldm(fresh(), ldm, latents, cond, checkpoint_dir=project / "ckpt", seed=0)
    longer = ldm.model_copy(update={"max_steps": 6})
    resumed = train_ldm(fresh(), longer, latents, cond, checkpoint_dir=project / "ckpt", seed=0)
    assert int(first.steps) == 4 and int(resumed.steps) == 6
    assert resumed.ema.optimization_step == 6  # EMA state came back from the checkpoint


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weighting_and_v_prediction_follow_their_definitions(prediction):
    ldm = TINY.model_copy(update={"prediction": prediction, "snr_gamma": 5.0, "uncond_prob": 0.0})
    module = LatentDiffusionModule(ldm.model_dump(mode="json"), 3, 4, 2, Conditioner("class", 2, 8))
    latents, cond = torch.randn(6, 3, 4, 4), torch.zeros(6, dtype=torch.long)
    torch.manual_seed(0)
    loss = module.loss(latents, cond)

    torch.manual_seed(0)  # the same draws, by hand
    noise = torch.randn_like(latents)
    t = torch.randint(0, ldm.timesteps, (6,))
    torch.rand(6)  # (label dropout's draw)
    alpha_bar = module.scheduler.alphas_cumprod[t]
    with torch.no_grad():
        noisy = alpha_bar.sqrt().view(-1, 1, 1, 1) * latents + (1 - alpha_bar).sqrt().view(-1, 1, 1, 1) * noise
        prediction_ = module.unet(noisy, t, encoder_hidden_states=module.conditioner(cond)).sample
    velocity = alpha_bar.sqrt().view(-1, 1, 1, 1) * noise - (1 - alpha_bar).sqrt().view(-1, 1, 1, 1) * latents
    target = noise if prediction == "epsilon" else velocity
    snr = alpha_bar / (1 - alpha_bar)
    weight = snr.clamp(max=5.0) / (snr if prediction == "epsilon" else snr + 1)
    expected = (((prediction_ - target) ** 2).mean(dim=(1, 2, 3)) * weight).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)
    assert module.sampling_scheduler("ddim").config.prediction_type == prediction
