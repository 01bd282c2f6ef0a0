"""``models:/autoencoder-f8-kl/<version>``: a first stage as an MLflow pyfunc (needs latentlab
installed: its loader reads the factor, regularizer and latent scale from the saved config).

    model = mlflow.pyfunc.load_model("models:/autoencoder-f8-kl@latest")
    reconstructions = model.predict(images)                           # uint8 (n, H, W, 3) -> same
    latents = model.predict(images, params={"output": "latents"})     # -> scaled (n, c, H/f, W/f)
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import torch


class FirstStageModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from components.first_stage import load_first_stage

        self.stage = load_first_stage(Path(context.artifacts["diffusers"]))

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        images = torch.from_numpy(np.ascontiguousarray(model_input, dtype=np.uint8)).permute(0, 3, 1, 2)
        latents = self.stage.encode_images(images)
        if (params or {}).get("output") == "latents":
            return latents.numpy()
        return self.stage.decode_latents(latents).permute(0, 2, 3, 1).numpy()


mlflow.models.set_model(FirstStageModel())
