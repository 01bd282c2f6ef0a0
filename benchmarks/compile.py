"""Does ``torch.compile`` pay back its compile time inside a sweep's 3-minute budget?

    python benchmarks/compile.py [--factors 8 32] [--steps 30]

For the first stage and the LDM UNet at each factor (default preset, 64 px, the precision the
platform picks), one bare training step (forward, loss, backward, Adam) eager and compiled:
the compile time (first compiled steps minus an eager step), the steady img/s of both, and the
break-even: how many seconds of training the speed-up needs to earn the compile time back.
Writes reports/benchmarks/compile.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from components.conditioning import Conditioner  # noqa: E402
from components.diffusion import LatentDiffusionModule  # noqa: E402
from components.first_stage import build_first_stage  # noqa: E402
from components.precision import decide  # noqa: E402
from components.presets import load_params  # noqa: E402

OUT = Path("reports/benchmarks")
BUDGET_S = 180


def ae_step(factor: int):
    params = load_params("params/default.yaml", [f"ae.factor={factor}"])
    stage = build_first_stage(params.ae, 64).train()
    optimizer = torch.optim.Adam(stage.parameters(), lr=1e-3)
    x = torch.rand(params.ae.batch_size, 3, 64, 64) * 2 - 1
    bf16 = decide(params.ae.precision, "autoencoder").value == "bf16-mixed"

    def loss_of(model, x):
        out = model.reconstruct(x)
        return (out.image - x).abs().mean() + 1e-6 * out.regularization

    return stage, optimizer, loss_of, (x,), bf16, params.ae.batch_size


def ldm_step(factor: int):
    params = load_params("params/default.yaml", [f"ae.factor={factor}"])
    channels, size, _ = build_first_stage(params.ae, 64).latent_shape(64)
    module = LatentDiffusionModule(
        params.ldm.model_dump(mode="json"), channels, size, 11, Conditioner("class", 11, params.ldm.context_dim)
    )
    optimizer = torch.optim.AdamW(module.unet.parameters(), lr=1e-3)
    batch = params.ldm.batch_size
    z, cond = torch.randn(batch, channels, size, size), torch.randint(0, 11, (batch,))
    bf16 = decide(params.ldm.precision, "ldm", size).value == "bf16-mixed"
    return module, optimizer, lambda m, z, c: m.loss(z, c), (z, cond), bf16, batch


def measure(model, optimizer, loss_of, inputs, bf16: bool, batch: int, steps: int, compiled: bool) -> dict:
    forward = torch.compile(loss_of) if compiled else loss_of
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

    def step():
        with autocast:
            loss = forward(model, *inputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    started = time.perf_counter()
    for _ in range(2):  # compiles (forward and backward graphs) on the first call
        step()
    warm = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        step()
    per_step = (time.perf_counter() - started) / steps
    return {"first_two_steps_s": round(warm, 2), "img_per_s": round(batch / per_step, 1), "step_s": per_step}


def main(factors: list[int], steps: int) -> dict:
    results = {}
    for factor in factors:
        for name, build in (("autoencoder", ae_step), ("ldm", ldm_step)):
            torch.manual_seed(0)
            eager = measure(*build(factor), steps=steps, compiled=False)
            torch.manual_seed(0)
            compiled = measure(*build(factor), steps=steps, compiled=True)
            compile_s = compiled["first_two_steps_s"] - 2 * eager["step_s"]
            saved_per_s = 1 - compiled["step_s"] / eager["step_s"]  # share of each training second saved
            break_even = compile_s / saved_per_s if saved_per_s > 0 else float("inf")
            row = {
                "eager_img_per_s": eager["img_per_s"],
                "compiled_img_per_s": compiled["img_per_s"],
                "speedup": round(eager["step_s"] / compiled["step_s"], 3),
                "compile_s": round(compile_s, 1),
                "break_even_training_s": round(break_even, 1) if break_even != float("inf") else None,
                "pays_within_budget": break_even < BUDGET_S,
            }
            results[f"{name}-f{factor}"] = row
            print(name, factor, json.dumps(row), flush=True)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factors", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    result = main(args.factors, args.steps)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "compile.json").write_text(json.dumps(result, indent=2))
