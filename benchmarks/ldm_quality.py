"""What an LDM setting buys in sample quality: the diffusion loss (equal steps) or the training
precision (equal wall time).

    python benchmarks/ldm_quality.py SWEEP_RUN_ID [--steps 4=300 8=400] [--samples 256]
    python benchmarks/ldm_quality.py SWEEP_RUN_ID --compare precision --minutes 4=3 8=3

``loss``: epsilon (the paper), Min-SNR-5, v-prediction, each for the same number of steps;
``precision``: fp32 against bf16 autocast, each for the same training minutes (bf16 must not cost
FID beyond its interval; ``ldm.precision=auto`` picks bf16 where it is faster).

Run where the sweep ran (same MLflow store and data/): it reuses the sweep's autoencoders and
domain extractor, so only the denoiser differs. For each factor, each variant trains the
default preset's LDM from the same seed on the same latents, then draws the evaluation's
samples and scores FID/KID with 95 % bootstrap intervals against the val split, exactly as
``latentlab evaluate`` does. Writes reports/benchmarks/ldm-<compare>.{json,md}.
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
from components.contract import TAG_DATA_VERSION
from components.dataset import load_split, read_manifest  # noqa: E402
from components.diffusion import LatentDiffusionModule  # noqa: E402
from components.evaluation import generate  # noqa: E402
from components.features import extractor_from_file  # noqa: E402
from components.ldm_training import train_ldm  # noqa: E402
from components.metrics import Reference  # noqa: E402
from components.presets import load_params  # noqa: E402
from components.store import tracking_uri  # noqa: E402
from components.sweep_summary import read_factor_entries  # noqa: E402

COMPARISONS = {
    "loss": {
        "epsilon (paper)": {"ldm.prediction": "epsilon"},
        "epsilon + Min-SNR-5": {"ldm.prediction": "epsilon", "ldm.snr_gamma": 5},
        "v-prediction + Min-SNR-5": {"ldm.prediction": "v_prediction", "ldm.snr_gamma": 5},
    },
    "precision": {
        "fp32": {"ldm.precision": "32-true"},
        "bf16 autocast": {"ldm.precision": "bf16-mixed"},
    },
}


def measure(sweep_run_id: str, variants: dict[str, dict], budgets: dict[int, str], samples: int) -> list[dict]:
    """``budgets``: per factor, ``ldm.max_steps=N`` or ``ldm.max_minutes=M`` (the other unlimited)."""
    mlflow.set_tracking_uri(tracking_uri())
    sweep = mlflow.MlflowClient().get_run(sweep_run_id)
    entries = read_factor_entries(sweep.data.tags)
    data_version = sweep.data.tags[TAG_DATA_VERSION]
    (extractor_file,) = sorted(workspace.STATE_DIR.glob("extractors/*.safetensors"))[-1:]
    extractor = extractor_from_file(extractor_file)
    images = {split: load_split(workspace.data_dir(), split) for split in ("train", "val")}
    classes = read_manifest(workspace.data_dir())["classes"]
    rows = []
    for factor, budget in budgets.items():
        stage = artifacts.first_stage_of(entries[factor].run("autoencoder"))
        z = stage.encode_images(images["train"][0])
        for name, overrides in variants.items():
            unlimited = "ldm.max_minutes=null" if "max_steps" in budget else f"ldm.max_steps={10**7}"
            params = load_params(
                "params/default.yaml",
                [f"ae.factor={factor}", budget, unlimited] + [f"{k}={v}" for k, v in overrides.items()],
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
            row = {"factor": factor, "variant": name, "steps": int(module.steps), "train_s": round(train_s, 1)}
            row |= {k: round(v, 4) for k, v in scores.items() if k.startswith(("fid", "kid"))}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def markdown(rows: list[dict], samples: int, compare: str) -> str:
    equal = "training steps" if compare == "loss" else "training time"
    lines = [
        f"FID/KID of {samples} samples (10 DDIM steps) after equal {equal}, val reference, 95 % bootstrap intervals.",
        "",
        f"| f | {compare} | steps | FID [95 %] | KID [95 %] | train s |",
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
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="loss")
    parser.add_argument("--steps", nargs="+", default=["4=300", "8=400"], help="factor=steps pairs (loss)")
    parser.add_argument("--minutes", nargs="+", default=["4=3", "8=3"], help="factor=minutes pairs (precision)")
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    key, pairs = ("ldm.max_steps", args.steps) if args.compare == "loss" else ("ldm.max_minutes", args.minutes)
    plan = {int(f): f"{key}={n}" for f, n in (pair.split("=") for pair in pairs)}
    result = measure(args.sweep_run_id, COMPARISONS[args.compare], plan, args.samples)
    out = Path("reports/benchmarks")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ldm-{args.compare}.json").write_text(json.dumps(result, indent=2))
    (out / f"ldm-{args.compare}.md").write_text(markdown(result, args.samples, args.compare))
    print(markdown(result, args.samples, args.compare))
