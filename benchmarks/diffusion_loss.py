"""Which diffusion loss learns fastest per step: epsilon (the paper), Min-SNR-5, v-prediction.

    python benchmarks/diffusion_loss.py SWEEP_RUN_ID [--steps 4=300 8=400] [--samples 256]

Run where the sweep ran (same MLflow store and data/): it reuses the sweep's autoencoders and
domain extractor, so only the denoiser differs. For each factor, each variant trains the
default preset's LDM from the same seed for the same number of steps on the same latents, then
draws the evaluation's samples and scores FID/KID with 95 % bootstrap intervals against the
val split, exactly as ``latentlab evaluate`` does. Writes reports/benchmarks/diffusion-loss.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from components import artifacts, workspace  # noqa: E402
from components.conditioning import conditioning_for  # noqa: E402
from components.dataset import load_split, read_manifest  # noqa: E402
from components.diffusion import LatentDiffusionModule  # noqa: E402
from components.evaluation import generate  # noqa: E402
from components.features import extractor_from_file  # noqa: E402
from components.ldm_training import train_ldm  # noqa: E402
from components.metrics import Reference  # noqa: E402
from components.params import load_params  # noqa: E402
from components.runs import TAG_DATA_VERSION, read_factor_entries  # noqa: E402
from components.store import tracking_uri  # noqa: E402

VARIANTS = {
    "epsilon (paper)": {"ldm.prediction": "epsilon"},
    "epsilon + Min-SNR-5": {"ldm.prediction": "epsilon", "ldm.snr_gamma": 5},
    "v-prediction + Min-SNR-5": {"ldm.prediction": "v_prediction", "ldm.snr_gamma": 5},
}


def measure(sweep_run_id: str, steps: dict[int, int], samples: int) -> list[dict]:
    mlflow.set_tracking_uri(tracking_uri())
    sweep = mlflow.MlflowClient().get_run(sweep_run_id)
    entries = read_factor_entries(sweep.data.tags)
    data_version = sweep.data.tags[TAG_DATA_VERSION]
    (extractor_file,) = sorted(workspace.STATE_DIR.glob("extractors/*.safetensors"))[-1:]
    extractor = extractor_from_file(extractor_file)
    images = {split: load_split(workspace.DATA_DIR, split) for split in ("train", "val")}
    classes = read_manifest(workspace.DATA_DIR)["classes"]
    rows = []
    for factor, n_steps in steps.items():
        stage = artifacts.first_stage_of(entries[factor].ae)
        z = stage.encode_images(images["train"][0])
        for name, overrides in VARIANTS.items():
            params = load_params(
                "params/default.yaml",
                [f"ae.factor={factor}", f"ldm.max_steps={n_steps}", "ldm.max_minutes=null"]
                + [f"{k}={v}" for k, v in overrides.items()],
            )
            conditioning = conditioning_for(
                "class",
                {s: pair[1] for s, pair in images.items()},
                classes,
                context_dim=params.ldm.context_dim,
                max_text_tokens=params.ldm.max_text_tokens,
                seed=params.seed,
            )
            real = Reference.of(
                images["val"][0],
                conditioning.cond["val"],
                extractor,
                data_version=data_version,
                split="val",
                cache_dir=workspace.fidelity_cache(),
            )
            channels, size, _ = stage.latent_shape(64)
            torch.manual_seed(params.seed)
            module = LatentDiffusionModule(
                params.ldm.model_dump(mode="json"), channels, size, len(classes), conditioning.conditioner
            )
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                train_ldm(module, params.ldm, z, conditioning.cond["train"], checkpoint_dir=Path(tmp), seed=params.seed)
            train_s = time.perf_counter() - started
            fake = generate(
                module,
                stage,
                real.conditions(samples, seed=params.seed),
                steps=params.eval.sample_steps,
                guidance_scale=params.eval.guidance_scale,
                seed=params.seed,
            )
            scores = real.score(fake.images, full=False, bootstrap=200, confidence=0.95, seed=params.seed)
            row = {"factor": factor, "variant": name, "steps": n_steps, "train_s": round(train_s, 1)}
            row |= {k: round(v, 4) for k, v in scores.items() if k.startswith(("fid", "kid"))}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def markdown(rows: list[dict], samples: int) -> str:
    lines = [
        f"FID/KID of {samples} samples (10 DDIM steps) after equal training steps, val reference, 95 % bootstrap intervals.",
        "",
        "| f | loss | steps | FID [95 %] | KID [95 %] | train s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['factor']} | {r['variant']} | {r['steps']} | {r['fid']:.2f} [{r['fid_ci_low']:.2f}, {r['fid_ci_high']:.2f}] "
            f"| {r['kid_mean']:.4f} [{r['kid_ci_low']:.4f}, {r['kid_ci_high']:.4f}] | {r['train_s']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_run_id")
    parser.add_argument("--steps", nargs="+", default=["4=300", "8=400"], help="factor=steps pairs")
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    plan = {int(f): int(s) for f, s in (pair.split("=") for pair in args.steps)}
    result = measure(args.sweep_run_id, plan, args.samples)
    out = Path("reports/benchmarks")
    out.mkdir(parents=True, exist_ok=True)
    (out / "diffusion-loss.json").write_text(json.dumps(result, indent=2))
    (out / "diffusion-loss.md").write_text(markdown(result, args.samples))
    print(markdown(result, args.samples))
