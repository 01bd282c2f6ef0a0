"""Two arms of sweeps compared factor by factor on every seed's KID: does a setting change sample quality?

    python benchmarks/compare_sweeps.py --a SWEEP_RUN_ID [...] --b SWEEP_RUN_ID [...]

Each arm pools the seeds of the sweeps named for it (two main jobs with different seeds make one
arm of four). Per factor: each arm's mean KID over its seeds, and where both arms have at least
two, B - A with Welch's test and Holm's correction over the factors at 95 % family-wise (the
verdict's statistics, ``components.comparison``): "B better" or "A better" only where the
corrected interval excludes 0. Run where the sweeps ran (same MLflow store). Writes
reports/benchmarks/compare-<first A>-<first B>.json.

Example, the pixel-loss question (L1 is the default; L2 must win at most factors to replace it):

    latentlab sweep --set sweep.seeds=3                          # arm A (L1)
    latentlab sweep --set sweep.seeds=3 --set ae.pixel_loss=l2   # arm B (L2)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import fmean

import mlflow

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from components.comparison import holm, welch  # noqa: E402
from components.store import tracking_uri  # noqa: E402
from components.sweep_summary import collect  # noqa: E402

CONFIDENCE = 0.95


def arm_scores(sweep_ids: list[str]) -> tuple[dict[int, list[float]], dict[int, set[str]], set[str]]:
    """Per factor, every seed's KID over the arm's sweeps and the evaluate runs it came from; and
    the feature extractors they used."""
    scores: dict[int, list[float]] = {}
    runs: dict[int, set[str]] = {}
    extractors = set()
    for sweep_id in sweep_ids:
        for row in collect(sweep_id, images=False).rows:
            for seed in row.all_seeds:
                if seed.kid_mean is not None:
                    scores.setdefault(row.factor, []).append(seed.kid_mean)
                    runs.setdefault(row.factor, set()).add(seed.runs.get("evaluate", ""))
                    extractors.add(seed.fid_extractor or "unrecorded")
    return scores, runs, extractors


def main(a: list[str], b: list[str]) -> dict:
    mlflow.set_tracking_uri(tracking_uri())
    (score_a, runs_a, ext_a), (score_b, runs_b, ext_b) = arm_scores(a), arm_scores(b)
    if len(ext_a | ext_b) > 1:
        sys.exit(f"The arms were scored by different feature extractors ({sorted(ext_a | ext_b)}): not one scale.")
    factors = sorted(set(score_a) & set(score_b))
    # A factor the setting does not touch (f = 1 has no autoencoder, so a first-stage setting
    # leaves its runs shared by both arms) is no comparison: it stays out of Holm's family.
    shared = {f for f in factors if runs_a[f] == runs_b[f]}
    tests = [
        (f, "a", *welch(score_b[f], score_a[f]))
        for f in factors
        if f not in shared and min(len(score_a[f]), len(score_b[f])) >= 2
    ]
    differences = {d.a: d for d in holm(tests, 1 - CONFIDENCE)}
    rows = []
    for f in factors:
        d = differences.get(f)
        row = {
            "f": f,
            "a_kid": score_a[f],
            "b_kid": score_b[f],
            "a_mean": fmean(score_a[f]),
            "b_mean": fmean(score_b[f]),
        }
        if d is not None:
            row |= {"b_minus_a": d.estimate, "low": d.low, "high": d.high, "level": d.level, "p": d.p}
            row["verdict"] = ("B better" if d.estimate < 0 else "A better") if d.claimed else "no difference shown"
        elif f in shared:
            row["verdict"] = "the same runs in both arms (not compared)"
        else:
            row["verdict"] = "not tested (an arm has one seed)"
        rows.append(row)
    result = {"a": a, "b": b, "metric": "KID", "confidence": CONFIDENCE, "factors": rows}
    out = Path("reports/benchmarks") / f"compare-{a[0][:8]}-{b[0][:8]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


def table(result: dict) -> str:
    lines = ["| f | A: KID per seed | B: KID per seed | B - A [Holm interval] | verdict |", "|---|---|---|---|---|"]
    for r in result["factors"]:
        seeds = [", ".join(f"{v:.3g}" for v in r[k]) for k in ("a_kid", "b_kid")]
        diff = f"{r['b_minus_a']:+.3g} [{r['low']:+.3g}, {r['high']:+.3g}]" if "b_minus_a" in r else "—"
        lines.append(f"| {r['f']} | {seeds[0]} | {seeds[1]} | {diff} | {r['verdict']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", nargs="+", required=True, metavar="SWEEP_RUN_ID")
    parser.add_argument("--b", nargs="+", required=True, metavar="SWEEP_RUN_ID")
    args = parser.parse_args()
    print(table(main(args.a, args.b)))
