"""``latentlab sample``: images from any recorded LDM run, at its training size or larger, or its
task applied to given images (super-resolution upscales them, inpainting fills their masks).

The model comes from the run's ``ldm/`` artifact and its first stage; the labels or captions its
conditioning table was built from come from the run's data version (restored from the DVC cache
or remote when ``data/`` holds another). Nothing is recorded: the images land in ``--out``.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
from PIL import Image
from prefect import flow, get_run_logger

from components import artifacts, progress, sampling, workspace
from components.contract import TAG_DATA_VERSION
from components.errors import UserError
from components.images import to_pil
from components.params import Params
from components.runs import run_of_stage
from flows.data import data_version_here

MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


def ldm_run_of(target: str) -> str:
    """The LDM run ``target`` names: a run id, or a registered model version (``models:/ldm/3``,
    ``models:/ldm@f8``), which points at the run that registered it."""
    if not target.startswith("models:/"):
        return run_of_stage(target, ("ldm",), "latentlab sample --run").info.run_id
    match = MODEL_URI.match(target)
    if not match:
        raise UserError(
            f"{target} is not a model URI this command reads: use models:/NAME/VERSION or models:/NAME@ALIAS."
        )
    client = mlflow.MlflowClient()
    try:
        if match["version"]:
            version = client.get_model_version(match["name"], match["version"])
        else:
            version = client.get_model_version_by_alias(match["name"], match["alias"])
    except mlflow.exceptions.MlflowException:
        raise UserError(
            f"{target} is not registered in this store: `latentlab runs --stage ldm` lists LDM runs."
        ) from None
    return run_of_stage(version.run_id, ("ldm",), "latentlab sample --run").info.run_id


@flow(name="sample")
def sample_flow(
    params: Params,
    target: str,
    out: Path,
    *,
    size: int = 1,
    count: int = 16,
    steps: int | None = None,
    images: Path | None = None,
    masks: Path | None = None,
) -> list[Path]:
    """Write the samples of LDM ``target`` into ``out`` as PNGs; return their paths."""
    run_id = ldm_run_of(target)
    version = mlflow.get_run(run_id).data.tags[TAG_DATA_VERSION]
    with workspace.reading_data(data_version_here(params.data, version)):
        model = artifacts.load_ldm(run_id, workspace.data_dir(), seed=params.seed)
    task, steps = model.module.params_.task, steps or model.module.params_.sample_steps
    given = sampling.read_images(images) if images is not None else None
    if task != "generate" and given is None:
        what = "images to upscale" if task == "superres" else "images and --masks to fill"
        raise UserError(f"Run {run_id} is a {task} model: pass --images DIR ({what}).")
    if task == "generate" and given is not None:
        raise UserError(f"Run {run_id} generates from noise: it takes no --images (drop it, or pick a task model).")
    if task == "inpaint" and masks is None:
        raise UserError(f"Run {run_id} is an inpaint model: pass --masks DIR, one mask per image (white: fill).")
    if task != "generate" and size != 1:
        raise UserError(f"--size is for models that generate; a {task} model's output size follows its input image.")
    with progress.phase("sampling"):
        if task == "superres":
            made = sampling.upscale(model, given, steps, params.seed)
        elif task == "inpaint":
            made = sampling.fill(model, given, sampling.read_images(masks, mode="L"), steps, params.seed)
        else:
            made = sampling.generate(model, count, size, steps, params.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for sample in made:
        path = out / f"{sample.name}.png"
        image: Image.Image = to_pil(sample.image[None])[0]
        workspace.write_atomically(path, lambda partial, image=image: image.save(partial, format="PNG"))
        paths.append(path)
    get_run_logger().info("%d image(s) from %s run %s in %s", len(paths), task, run_id, out)
    return paths
