"""``models:/ldm-superres@f4``, ``models:/ldm-inpaint@f8``: an LDM that is given an image
(``ldm.task`` superres or inpaint) as an MLflow pyfunc (needs latentlab installed, as the
autoencoder's: it loads the run's ``ldm/`` folder and first stage with latentlab's loaders).

    model = mlflow.pyfunc.load_model("models:/ldm-superres@f4")
    model.metadata.metadata["task"]                                   # "superres"
    large = model.predict(small, params={"steps": 50, "seed": 0})     # uint8 (n, h, w, 3) -> (n, 4h, 4w, 3)
    model = mlflow.pyfunc.load_model("models:/ldm-inpaint@f8")
    filled = model.predict({"image": images, "mask": masks})          # masks (n, H, W): nonzero = fill

Cross-attention context: the null row (models trained with ``ldm.conditioning`` class or none;
a text-conditioned one needs its captions' encoder: sample it with ``latentlab sample``).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import torch


class LDMTask(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from components.artifacts import TrainedLDM
        from components.conditioning import Conditioner
        from components.diffusion import LatentDiffusionModule, read_config
        from components.first_stage import FirstStage, load_first_stage
        from components.params import LDMParams

        directory = Path(context.artifacts["ldm"])
        config = read_config(directory)
        if config["conditioning"] == "text":
            raise ValueError("a text-conditioned task model needs its captions: use `latentlab sample --run RUN_ID`")
        ldm = LDMParams.model_validate(config["ldm"])
        conditioner = Conditioner(config["conditioning"], config["num_classes"], ldm.context_dim)
        module = LatentDiffusionModule.from_pretrained(directory, conditioner)
        first = context.artifacts.get("diffusers")
        stage = load_first_stage(Path(first)) if first else FirstStage()
        self.model, self.task = TrainedLDM(module, stage, None, config), ldm.task

    def predict(self, context, model_input, params: dict | None = None) -> np.ndarray:
        from components import sampling

        params = params or {}
        steps, seed = int(params.get("steps", 50)), int(params.get("seed", 0))
        arrays = model_input if self.task == "superres" else model_input["image"]
        images = {f"{i:06d}": torch.from_numpy(np.ascontiguousarray(a, dtype=np.uint8)).permute(2, 0, 1)
                  for i, a in enumerate(arrays)}  # fmt: skip
        if self.task == "superres":
            made = sampling.upscale(self.model, images, steps, seed)
        else:
            masks = {name: torch.from_numpy((np.asarray(m) > 0).astype(np.uint8) * 255)[None]
                     for name, m in zip(images, model_input["mask"], strict=True)}  # fmt: skip
            made = sampling.fill(self.model, images, masks, steps, seed)
        return np.stack([m.image.permute(1, 2, 0).numpy() for m in made])


mlflow.models.set_model(LDMTask())
