"""``models:/ldm@f8``: one factor's latent diffusion model as an MLflow pyfunc, wrapping the
diffusers ``StableDiffusionPipeline`` the LDM run exported (needs diffusers and torch only).

    model = mlflow.pyfunc.load_model("models:/ldm@f8")
    images = model.predict(pd.DataFrame({"label": ["Animals & Nature", "Food & Drink"]}),
                           params={"steps": 50, "seed": 0, "guidance_scale": 1.0})
    # uint8 array (n, H, W, 3). Text-conditioned models take a "prompt" column; unconditional
    # ones any column (one image per row).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file


class LDMPipeline(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from diffusers import StableDiffusionPipeline

        directory = Path(context.artifacts["pipeline"])
        facts = json.loads((directory / "latentlab.json").read_text())
        self.resolution, self.mode = int(facts["resolution"]), facts["conditioning"]
        options = {"safety_checker": None, "requires_safety_checker": False}
        if self.mode == "text":
            self.pipeline = StableDiffusionPipeline.from_pretrained(directory, **options)
            return
        self.pipeline = StableDiffusionPipeline.from_pretrained(directory, text_encoder=None, tokenizer=None, **options)
        self.contexts = load_file(directory / "contexts.safetensors")["contexts"]
        self.rows = json.loads((directory / "contexts.json").read_text())["rows"]

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        params = params or {}
        n = len(model_input)
        options = dict(
            num_inference_steps=int(params.get("steps", 50)),
            guidance_scale=float(params.get("guidance_scale", 1.0)),
            generator=torch.Generator().manual_seed(int(params.get("seed", 0))),
            height=self.resolution,
            width=self.resolution,
            output_type="np",
        )
        if self.mode == "text":
            images = self.pipeline(prompt=list(model_input["prompt"]), **options).images
        else:
            if self.mode == "class":
                unknown = sorted(set(model_input["label"]) - set(self.rows[:-1]))
                if unknown:
                    raise ValueError(f"unknown labels {unknown}; this model knows {self.rows[:-1]}")
                rows = [self.rows.index(label) for label in model_input["label"]]
            else:
                rows = [len(self.rows) - 1] * n  # the unconditional row
            unconditional = self.contexts[-1:].expand(n, -1, -1)
            images = self.pipeline(
                prompt_embeds=self.contexts[rows], negative_prompt_embeds=unconditional, **options
            ).images
        return (images * 255).round().astype(np.uint8)


mlflow.models.set_model(LDMPipeline())
