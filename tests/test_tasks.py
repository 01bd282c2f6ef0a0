"""The denoiser's tasks (``ldm.task``): the concatenated inputs at every f, masks, scores, and a
super-resolution and an inpainting sweep end to end on a tiny OpenMoji subset."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from components.conditioning import Conditioner
from components.diffusion import LatentDiffusionModule
from components.evaluation import mean_fill, task_scores
from components.first_stage import FirstStage, build_first_stage
from components.params import AEParams, LDMParams, Params
from components.tasks import complete, condition_channels, draw_masks, task_inputs
from flows.cli import main
from flows.pipeline import sweep_flow

REPO = Path(__file__).resolve().parents[1]

IMAGES = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("task", ["superres", "inpaint"])
@pytest.mark.parametrize("factor", [1, 2, 4, 8, 16, 32])
def test_the_denoiser_takes_the_task_image_stacked_on_its_latent_at_every_factor(task, factor):
    ldm = LDMParams(task=task, widths=[16, 16], conditioning="none")
    stage = FirstStage() if factor == 1 else build_first_stage(AEParams(factor=factor, base_channels=8), 64)
    channels, size, _ = stage.latent_shape(64)
    inputs = task_inputs(ldm, IMAGES, stage, seed=0)
    stacked = condition_channels(ldm, channels)
    assert stacked == (3 if task == "superres" else channels + 1)  # RGB low-res | mask + encoded masked image
    assert inputs.concat.shape == (2, stacked, size, size)
    module = LatentDiffusionModule(ldm.model_dump(mode="json"), channels, size, 1, Conditioner("none", 1, 8), stacked)
    assert module.unet.config.in_channels == channels + stacked and module.unet.config.out_channels == channels
    cond = torch.zeros(2, dtype=torch.long)
    assert torch.isfinite(module.loss(stage.encode_images(IMAGES), cond, inputs.concat))
    assert module.sample(cond, concat=inputs.concat, steps=2).shape == (2, channels, size, size)


def test_superres_gives_the_low_resolution_image_at_the_latent_size():
    ldm = LDMParams(task="superres", superres_scale=4, conditioning="none")
    f4 = build_first_stage(AEParams(factor=4, base_channels=8), 64)
    exact = task_inputs(ldm, IMAGES, f4, seed=0)  # x4 on f=4 latents: the paper's setting, no resizing
    low = torch.nn.functional.interpolate(IMAGES.float() / 127.5 - 1, size=16, mode="bicubic", antialias=True)
    assert torch.allclose(exact.concat, low.clamp(-1, 1), atol=1e-5)
    assert exact.shown.shape == IMAGES.shape and exact.shown.dtype == torch.uint8  # bicubic-upsampled: the baseline
    degraded = task_inputs(ldm.model_copy(update={"superres_degradation": "blur_noise"}), IMAGES, f4, seed=0)
    assert degraded.concat.shape == exact.concat.shape and not torch.allclose(degraded.concat, exact.concat)


def test_masks_are_seeded_holes_of_boxes_and_strokes_and_inpainting_keeps_the_known_pixels():
    draw = lambda kind, seed: draw_masks(64, (32, 32), kind, torch.Generator().manual_seed(seed))  # noqa: E731
    for kind in ("boxes", "strokes", "mixed"):
        masks = draw(kind, 0)
        assert torch.equal(masks, draw(kind, 0)) and not torch.equal(masks, draw(kind, 1))
        share = masks.flatten(1).mean(1)
        assert set(masks.unique().tolist()) == {0.0, 1.0} and (share > 0.02).all() and (share < 0.9).all(), kind
    boxes = draw("boxes", 0)[:, 0]  # a box is its own bounding box
    rows, cols = boxes.any(2).sum(1), boxes.any(1).sum(1)
    assert torch.equal(boxes.flatten(1).sum(1), (rows * cols).float())

    ldm = LDMParams(task="inpaint", conditioning="none")
    inputs = task_inputs(ldm, IMAGES, FirstStage(), seed=3)
    hole = inputs.masks.bool().expand_as(IMAGES)
    assert (inputs.shown[hole] == 128).all() and torch.equal(inputs.shown[~hole], IMAGES[~hole])
    assert torch.equal(inputs.concat[:, :1], inputs.masks)  # pixel space: the mask at full size, then the image
    white = torch.full_like(IMAGES, 255)
    done = complete(white, IMAGES, inputs)
    assert torch.equal(done[~hole], IMAGES[~hole]) and (done[hole] == 255).all()
    scores = task_scores(ldm, IMAGES, done, inputs, confidence=0.95, seed=0)
    expected = float(((255 - IMAGES.float()) / 255)[hole].mean())  # (two holes of about the same size)
    assert scores["mask_l1"] == pytest.approx(expected, rel=0.2)
    assert scores["mask_l1_ci_low"] <= scores["mask_l1"] <= scores["mask_l1_ci_high"]
    perfect = task_scores(ldm, IMAGES, IMAGES, inputs, confidence=0.95, seed=0)
    assert perfect["mask_l1"] == 0 and perfect["mask_psnr"] == 100
    # The baseline a model must beat: each hole its image's mean known colour, whatever the outputs.
    filled = mean_fill(IMAGES, hole)
    assert torch.equal(filled[~hole], IMAGES[~hole])
    colour = IMAGES[0, :, ~hole[0, 0]].float().mean(1).round()
    assert torch.equal(filled[0, :, hole[0, 0]].float(), colour[:, None].expand(3, int(hole[0, 0].sum())))
    assert scores["mask_l1_mean_fill"] == perfect["mask_l1_mean_fill"] > 0
    assert scores["mask_psnr_mean_fill"] == perfect["mask_psnr_mean_fill"] < 100


def test_an_inpainting_ldm_on_4_latent_channels_exports_a_diffusers_pipeline_that_samples_as_latentlab(tmp_path):
    from diffusers import StableDiffusionInpaintPipeline
    from safetensors.torch import load_file

    from components.ldm_training import export_pipeline, exports_pipeline
    from components.tasks import inpaint_inputs

    images = IMAGES[:, :, ::2, ::2].contiguous()  # 32 px
    f4 = build_first_stage(AEParams(factor=4, base_channels=8), 32)
    assert not exports_pipeline("inpaint", f4) and not exports_pipeline("superres", f4)  # 3 latent channels
    stage = build_first_stage(AEParams(factor=4, base_channels=8, latent_channels=4), 32)  # f=8's channels
    assert exports_pipeline("inpaint", stage) and not exports_pipeline("inpaint", FirstStage())
    stage.fit_scale(images)
    ldm = LDMParams(task="inpaint", widths=[16, 16], conditioning="none", sampler="ddim")
    module = LatentDiffusionModule(ldm.model_dump(mode="json"), 4, 8, 1, Conditioner("none", 1, 8), 5)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:20, 12:28] = 1  # on the 4-pixel grid: nearest and area resizing agree
    inputs = inpaint_inputs(images[:1], mask, stage)
    cond = torch.full((1,), module.conditioner.null)
    latents = module.sample(cond, concat=inputs.concat, steps=3, generator=torch.Generator().manual_seed(0))
    ours = stage.decode_latents(latents)

    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        export_pipeline(module, stage, [], tmp_path), text_encoder=None, tokenizer=None, safety_checker=None
    )
    assert pipe.unet.config.in_channels == 9 and pipe.vae.config.scaling_factor == pytest.approx(stage.scale)
    out = pipe(
        prompt_embeds=load_file(tmp_path / "contexts.safetensors")["contexts"][-1:],
        image=Image.fromarray(images[0].permute(1, 2, 0).numpy()),
        mask_image=Image.fromarray((mask[0, 0] * 255).byte().numpy()),
        masked_image_latents=inputs.concat[:, 1:],  # latentlab encodes the posterior's mode; diffusers samples it
        latents=torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)),
        num_inference_steps=3,
        guidance_scale=1.0,
        height=32,
        width=32,
        output_type="np",
    ).images
    theirs = torch.from_numpy(out * 255).round().permute(0, 3, 1, 2)
    assert (theirs - ours.float()).abs().max() <= 1


def test_a_superres_scale_that_does_not_divide_the_image_is_refused():
    with pytest.raises(ValueError, match="superres_scale=3 does not divide data.resolution=64"):
        Params.model_validate({"ldm": {"task": "superres", "superres_scale": 3}})


@pytest.mark.slow
def test_superres_and_inpaint_sweeps_train_evaluate_report_and_sample_each_task(project, tiny, tiny_sweep):
    models, where = {}, ["--params", str(REPO / "params/smoke.yaml"), *(f"--set={s}" for s in tiny_sweep)]
    # inpainting at f=8 as well: its 4 latent channels are what diffusers' inpainting pipeline takes.
    # (Its 2x2 latent reaches a 1x1 UNet level: 64 channels keep two per GroupNorm group there.)
    tasks = (
        ("superres", 4, {"sr_psnr", "sr_ssim", "sr_psnr_bicubic"}, []),
        ("inpaint", 8, {"mask_l1", "mask_l1_mean_fill"}, ["ldm.widths=[64, 64]"]),
    )
    for task, top, measures, extra in tasks:
        result = sweep_flow(tiny(f"ldm.task={task}", "ldm.conditioning=none", f"sweep.factors=[1, {top}]", *extra))
        sweep = mlflow.get_run(result.run_id)
        assert sweep.data.tags["latentlab.task"] == task
        for factor in (1, top):
            entry = json.loads(sweep.data.tags[f"latentlab.sweep.f{factor}"])
            assert entry["status"] == "finished", entry
            ldm, evaluate = (mlflow.get_run(entry[stage]) for stage in ("ldm", "evaluate"))
            assert ldm.data.tags["latentlab.task"] == evaluate.data.tags["latentlab.task"] == task
            metrics = evaluate.data.metrics
            assert measures <= set(metrics) and {"kid_mean", "fid"} <= set(metrics)
            assert 0 < metrics[min(measures)] < 100
            ldm_json = json.loads(_artifact_text(entry["ldm"], "ldm/ldm.json"))
            assert ldm_json["task"] == task and ldm_json["condition_channels"] > 0
            exported = {a.path for a in mlflow.MlflowClient().list_artifacts(entry["ldm"])}
            assert ("pipeline" in exported) == (task == "inpaint" and factor == 8), (task, factor)
        report = result.report.read_text()
        title = {"superres": "super-resolution x4", "inpaint": "inpainting"}[task]
        assert f"# Compression factor ablation for {title}" in report
        assert "no shape from the paper is checked" in report
        baseline = {"superres": "bicubic upsampling", "inpaint": "its image's mean colour"}[task]
        assert baseline in report.split("## Results")[0]  # the verdict weighs the task's baseline
        assert f"### {title.split(' x')[0].capitalize()} measures" in report
        by_f = mlflow.MlflowClient().get_metric_history(result.run_id, f"by_f/{min(measures)}")
        assert sorted(m.step for m in by_f) == [1, top]
        models[task] = json.loads(sweep.data.tags[f"latentlab.sweep.f{top}"])["ldm"]
    pipeline = json.loads(_artifact_text(models["inpaint"], "pipeline/model_index.json"))
    assert pipeline["_class_name"] == "StableDiffusionInpaintPipeline"

    # `latentlab sample` applies each model's task to the images it is given: 8 px -> 32 px (x4),
    # and masks filled where white, every other pixel kept.
    side = tiny().data.resolution
    given, holes = project / "given", project / "holes"
    for folder, size, mode in ((given / "low", side // 4, "RGB"), (given / "full", side, "RGB"), (holes, side, "L")):
        folder.mkdir(parents=True)
        for i in range(2):
            if mode == "L":
                mask = Image.new("L", (size, size), 0)
                mask.paste(255, (4 + 8 * i, 4, 20 + 8 * i, 20))
                mask.save(folder / f"img{i}.png")
            else:
                Image.effect_noise((size, size), 60 + 20 * i).convert("RGB").save(folder / f"img{i}.png")
    assert main(["sample", "--run", models["superres"], "--images", str(given / "low"), "--out", "up", *where]) == 0
    assert sorted(p.name for p in (project / "up").iterdir()) == ["img0.png", "img1.png"]
    assert Image.open(project / "up" / "img0.png").size == (side, side)
    assert main(["sample", "--run", models["inpaint"], "--images", str(given / "full"), "--masks", str(holes),
                 "--out", "filled", *where]) == 0  # fmt: skip
    filled = np.asarray(Image.open(project / "filled" / "img1.png"))
    original, hole = (
        np.asarray(Image.open(given / "full" / "img1.png")),
        np.asarray(Image.open(holes / "img1.png")) > 127,
    )
    assert (filled[~hole] == original[~hole]).all() and filled.shape == original.shape
    # Each task's registered pyfunc model (the sweeps pointed @f4, @f8 at those versions), its task recorded.
    low = np.stack([np.asarray(Image.open(given / "low" / f"img{i}.png")) for i in range(2)])
    superres = mlflow.pyfunc.load_model("models:/ldm-superres@f4")
    assert superres.metadata.metadata["task"] == "superres"
    assert superres.predict(low, params={"steps": 2}).shape == (2, side, side, 3)
    inpaint = mlflow.pyfunc.load_model("models:/ldm-inpaint@f8")
    full = np.stack([original, original])
    out = inpaint.predict({"image": full, "mask": np.stack([hole, hole])}, params={"steps": 2})
    assert out.shape == full.shape and (out[:, ~hole] == full[:, ~hole]).all()
    # A task model without its images, or at another size: a clear error, exit 2, nothing written.
    assert main(["sample", "--run", models["superres"], "--out", "none", *where]) == 2
    assert main(["sample", "--run", models["inpaint"], "--images", str(given / "full"), "--out", "none", *where]) == 2
    assert main(["sample", "--run", models["superres"], "--images", str(given / "low"), "--size", "2", *where]) == 2
    assert not (project / "none").exists()


def _artifact_text(run_id: str, path: str) -> str:
    return mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")
