"""Autoencoder benchmarks (issue: autoencoder stage).

    python benchmarks/autoencoder.py throughput   # img/s per f, smoke and default settings, 64 px
    python benchmarks/autoencoder.py quality      # train every f with the default params, PSNR table

Run from the repository root with the virtual environment active. ``quality`` trains through
the real flow (MLflow, registry, reuse), so a second call only reads the finished runs.
Results are printed as Markdown and written to reports/benchmarks/.
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import pairwise
from pathlib import Path

from components.autoencoder_training import AutoencoderModule
from components.dataset import load_split
from components.params import load_params
from components.workspace import DATA_DIR

FACTORS = (2, 4, 8, 16, 32)
OUT = Path("reports/benchmarks")


def throughput(steps: int = 4) -> list[dict]:
    images, _ = load_split(DATA_DIR, "train")
    rows = []
    for preset in ("smoke", "default"):
        for factor in FACTORS:
            params = load_params(
                f"params/{preset}.yaml", [f"ae.factor={factor}", "data.resolution=64", "ae.disc_start=0"]
            )
            module = AutoencoderModule(params.ae.model_dump(mode="json"), 64)
            optimizers = module.configure_optimizers()
            module.optimizers = lambda o=optimizers: o
            module.manual_backward = lambda loss: loss.backward()
            module.log = lambda *a, **k: None
            batch = (images[: params.ae.batch_size],)
            module.training_step(batch, 0)  # warm-up
            started = time.perf_counter()
            for _ in range(steps):
                module.training_step(batch, 0)
            rate = steps * params.ae.batch_size / (time.perf_counter() - started)
            rows.append(
                {
                    "preset": preset,
                    "factor": factor,
                    "batch": params.ae.batch_size,
                    "img_per_s": round(rate, 1),
                    "params_M": round(sum(p.numel() for p in module.stage.parameters()) / 1e6, 2),
                }
            )
            print(rows[-1], flush=True)
    return rows


def quality() -> list[dict]:
    import mlflow

    from flows.autoencoder import autoencoder_flow

    rows = []
    for factor in FACTORS:
        params = load_params("params/default.yaml", [f"ae.factor={factor}"])
        result = autoencoder_flow(params)
        run = mlflow.get_run(result.run_id)
        m = run.data.metrics
        rows.append(
            {
                "factor": factor,
                "latent_channels": run.data.params.get("ae.latent_channels"),
                "steps": int(m.get("images_seen", 0)) // params.ae.batch_size,
                "psnr": round(m["psnr"], 2),
                "ssim": round(m["ssim"], 3),
                "rfid": round(m["rfid"], 3),
                "run_id": result.run_id,
            }
        )
        print(rows[-1], flush=True)
    psnr = [r["psnr"] for r in rows]
    print("PSNR falls as f grows:", all(a > b for a, b in pairwise(psnr)))
    return rows


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["throughput", "quality"])
    args = parser.parse_args()
    rows = throughput() if args.what == "throughput" else quality()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"autoencoder-{args.what}.json").write_text(json.dumps(rows, indent=2))
    (OUT / f"autoencoder-{args.what}.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))
