"""Training on one process against two (DDP over gloo), the autoencoder and the LDM (issue 15).

    python benchmarks/distributed.py              # f = 8, 64 px, default params, 40 steps
    python benchmarks/distributed.py --steps 20

Each run trains latentlab's own loop (``train_autoencoder``, ``train_ldm``) on random data shaped
like the default preset's, with ``devices`` = 1 and then 2, and reads its images/s the way the
MLflow reports do (every process's batches over the training seconds rank 0 counted). On a CPU
the processes share its cores (``distributed.threads_per_rank``), so two processes pay only
where one process cannot use all of them. Results in reports/benchmarks/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from components.autoencoder_training import train_autoencoder
from components.conditioning import Conditioner
from components.diffusion import LatentDiffusionModule
from components.first_stage import build_first_stage
from components.ldm_training import train_ldm
from components.presets import load_params

OUT = Path("reports/benchmarks")


def img_per_s(module, devices: int, batch: int) -> float:
    return int(module.steps) * batch * devices / float(module.train_seconds)


def best(results: dict, key: str, value: float) -> None:
    results[key] = max(results.get(key, 0.0), round(value, 1))


def main(steps: int) -> dict:
    params = load_params(Path("params/default.yaml"), [])
    resolution, results = params.data.resolution, {}
    images = torch.randint(0, 256, (512, 3, resolution, resolution), dtype=torch.uint8)
    channels, size, _ = build_first_stage(params.ae, resolution).latent_shape(resolution)
    latents, cond = torch.randn(512, channels, size, size), torch.randint(0, 11, (512,))
    # One process runs before and after two, its better reading counting: a process speeds up
    # over its first minute (benchmarks/precision.py), which would flatter whatever runs second.
    for devices in (1, 2, 1):
        budget = {"max_steps": steps, "max_minutes": None, "devices": devices, "image_every": 10**6}
        with tempfile.TemporaryDirectory() as scratch:
            ae = params.ae.model_copy(update=budget)
            module = train_autoencoder(ae, images, resolution=resolution, checkpoint_dir=Path(scratch) / "ae", seed=0)
            best(results, f"autoencoder_img_per_s_{devices}", img_per_s(module, devices, ae.batch_size))
            ldm = params.ldm.model_copy(update=budget)
            model = LatentDiffusionModule(
                ldm.model_dump(mode="json"), channels, size, 11, Conditioner("class", 11, ldm.context_dim)
            )
            model = train_ldm(model, ldm, latents, cond, checkpoint_dir=Path(scratch) / "ldm", seed=0)
            best(results, f"ldm_img_per_s_{devices}", img_per_s(model, devices, ldm.batch_size))
        print(devices, results, flush=True)
    results["autoencoder_two_over_one"] = round(
        results["autoencoder_img_per_s_2"] / results["autoencoder_img_per_s_1"], 2
    )
    results["ldm_two_over_one"] = round(results["ldm_img_per_s_2"] / results["ldm_img_per_s_1"], 2)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "distributed.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    print(json.dumps(main(parser.parse_args().steps), indent=2))
