"""How fast a user error comes back: the installed ``latentlab`` command, as a user types it,
timed from start to exit for the mistakes a user makes most. The goal is 2 s (issue 14).

    python benchmarks/errors.py [--repeats 5]

Each case runs in a fresh scratch project (git + DVC, no Prefect server): once with no
``mlflow.db`` yet (a new project), once with a store that holds runs (``mlflow.db`` made by
MLflow, with a finished run). Reports the median and the slowest of ``--repeats`` runs, the exit code
and the message, and writes reports/benchmarks/errors.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LATENTLAB = str(Path(sys.executable).with_name("latentlab"))
UNKNOWN_RUN = "0123456789abcdef0123456789abcdef"
CASES = {
    "missing image folder": ["data", "--set", "data.source=folder", "--set", "data.path=no/such/folder"],
    "unknown run (evaluate)": ["evaluate", "--run", UNKNOWN_RUN],
    "unknown run (report)": ["report", "--run", UNKNOWN_RUN],
    "bad parameter": ["train-ae", "--set", "ae.factor=3"],
}


def scratch_project(root: Path) -> Path:
    root.mkdir()
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=root, check=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    return root


def with_store(root: Path) -> Path:
    """``root`` with an MLflow store holding one finished run, as after any earlier command."""
    script = "import mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db'); mlflow.start_run(); mlflow.end_run()"
    subprocess.run([sys.executable, "-c", script], cwd=root, check=True, capture_output=True)
    return root


def timed(args: list[str], cwd: Path) -> tuple[float, int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    started = time.perf_counter()
    done = subprocess.run([LATENTLAB, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    return time.perf_counter() - started, done.returncode, " ".join(done.stderr.split())[-200:]


def main(repeats: int) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, args) in enumerate(CASES.items()):
            fresh = [timed(args, scratch_project(Path(tmp) / f"{i}-{r}")) for r in range(repeats)]
            used = with_store(scratch_project(Path(tmp) / f"{i}-store"))
            existing = [timed(args, used) for _ in range(repeats)]
            for label, runs in (("new project", fresh), ("existing store", existing)):
                seconds = [s for s, _, _ in runs]
                results[f"{name}, {label}"] = {
                    "median_s": round(statistics.median(seconds), 2),
                    "max_s": round(max(seconds), 2),
                    "exit_codes": sorted({code for _, code, _ in runs}),
                    "message": runs[-1][2],
                }
    for name, r in results.items():
        print(f"{name:45s} median {r['median_s']:5.2f} s  max {r['max_s']:5.2f} s  exit {r['exit_codes']}")
    out = ROOT / "reports" / "benchmarks" / "errors.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"repeats": repeats, "goal_s": 2.0, "cases": results}, indent=2))
    print(f"written to {out}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    main(parser.parse_args().repeats)
