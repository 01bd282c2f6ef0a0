"""The sweep's verdict: which factor is best, and what the evidence does and does not carry.

Factors are ranked by KID over every seed (``components.comparison``: training and evaluation
noise together); "A beats B" is said only where Holm's correction over all pairs leaves the
difference's interval clear of 0, and a single winner only where it beats every other factor.
With one seed per factor training noise is unmeasured and no winner is named. Scores from
different feature extractors are never compared: they are not on one scale.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

from components.comparison import METRIC, Comparison, compare

if TYPE_CHECKING:  # (only names for annotations: the report's import chain stays short)
    from components.sweep_summary import FactorRow, SweepSummary

PAPER_MID = (4, 8, 16)  # Figure 6: these win ...
PAPER_EXTREMES = (1, 32)  # ... over pixel space and the most aggressive compression
SHOWN_P_BEST = 0.01  # P(best) below this is left out of the sentence (the table has them all)


def comparable(rows: list[FactorRow]) -> tuple[str | None, list[FactorRow], list[FactorRow]]:
    """(extractor, rows with a KID from it, rows with a KID from another or an unrecorded one).

    The most common recorded extractor wins; a tie goes to the one seen at the smallest f, so the
    choice never depends on which scores happen to look better.
    """
    scored = [r for r in rows if r.kid_mean is not None]
    counts = Counter(r.fid_extractor for r in scored if r.fid_extractor)
    if not counts:
        return None, scored, []  # nothing recorded: compared, with a caveat in the verdict
    top = max(counts.values())
    extractor = next(r.fid_extractor for r in scored if counts.get(r.fid_extractor) == top)
    inside = [r for r in scored if r.fid_extractor == extractor]
    return extractor, inside, [r for r in scored if r.fid_extractor != extractor]


def comparison(rows: list[FactorRow], confidence: float = 0.95) -> Comparison | None:
    """The comparable factors compared on every seed's KID (None: no factor has one)."""
    extractor, inside, _ = comparable(rows)
    scores, intervals = {}, {}
    for row in inside:
        seeds = [x for x in row.all_seeds if x.kid_mean is not None and x.fid_extractor == row.fid_extractor]
        scores[row.factor] = [x.kid_mean for x in seeds]
        intervals[row.factor] = [(x.kid_ci_low, x.kid_ci_high) for x in seeds if x.kid_ci_low is not None]
    return compare(scores, evaluation_intervals=intervals, confidence=confidence) if scores else None


def best_factor(summary: SweepSummary) -> FactorRow | None:
    """The factor most likely best (highest P(best)); None when no factor has a score."""
    result = comparison(summary.rows)
    if result is None:
        return None
    best = max(result.p_best, key=lambda f: (result.p_best[f], -result.estimate[f]))
    return next(r for r in summary.rows if r.factor == best)


def verdict(summary: SweepSummary) -> str:
    """A short paragraph: what can be claimed, how likely each factor is best, the paper's shape,
    and the caveats."""
    extractor, rows, left_out = comparable(summary.rows)
    budget = f"under the recorded budget ({summary.budget})" if summary.budget else "(budget not recorded)"
    result = comparison(summary.rows)
    if result is None:
        return f"No factor has an evaluation {METRIC} yet {budget}, so there is no winner to name."
    seeds = sorted({len(s) for s in result.scores.values()})
    parts = [
        f"Ranked by {METRIC} (unbiased in the number of samples) {budget}, "
        f"over {'/'.join(map(str, seeds))} trained model(s) per factor. {_p_best(result)}"
    ]
    if result.training_noise_measured:
        parts.append(_claims(result))
    else:
        parts.append(
            "**Training noise is unmeasured** (one trained model for "
            + ", ".join(f"f={f}" for f, s in result.scores.items() if len(s) < 2)
            + "), so no winner is named: P(best) above holds evaluation noise only, and a second seed of "
            "the same factor has scored outside such intervals. Run with `--set sweep.seeds=2` or more."
        )
    parts.append(_shape(summary.rows, result) if summary.task == "generate" else _task_shape(summary))
    if extractor:
        parts.append(f"Features: `{extractor}`.")
    else:
        parts.append("No evaluate run recorded its feature extractor; the comparison assumes they used the same one.")
    if left_out:
        names = ", ".join(f"f={r.factor} (`{r.fid_extractor or 'unrecorded'}`)" for r in left_out)
        parts.append(
            f"Left out of the comparison: {names}, because their scores come from a different feature extractor "
            "and scores from different networks are not on the same scale."
        )
    if any(r.small_sample for r in rows):
        parts.append("FID from fewer than 5,000 samples is biased upward, so it ranks nothing here; FID∞ corrects it.")
    return " ".join(parts)


def _p_best(result: Comparison) -> str:
    shown = sorted((f for f, p in result.p_best.items() if p >= SHOWN_P_BEST), key=lambda f: -result.p_best[f])
    rest = len(result.p_best) - len(shown)
    return (
        "Probability of being best: "
        + ", ".join(f"f={f} {result.p_best[f]:.2f}" for f in shown)
        + (f" (the other {rest} below {SHOWN_P_BEST:.2f})" if rest else "")
        + "."
    )


def _claims(result: Comparison) -> str:
    pairs = len(result.differences)
    holm = f"after Holm's correction over {pairs} pair{'s' if pairs != 1 else ''} ({result.confidence:.0%} family-wise)"
    if not result.claims:
        return f"**No winner**: no two factors differ beyond training and evaluation noise {holm}."
    beaten: dict[int, list[int]] = {}
    for d in result.claims:
        beaten.setdefault(d.better, []).append(d.worse)
    said = "; ".join(
        f"f={better} beats " + ", ".join(f"f={w}" for w in sorted(worse)) for better, worse in sorted(beaten.items())
    )
    top = result.ranked()[0]
    others = set(result.scores) - {top}
    if others and set(beaten.get(top, [])) == others:
        lead = f"**f={top} is best**: it beats every other factor {holm}."
    else:
        unresolved = sorted(others - set(beaten.get(top, [])))
        lead = (
            f"**No single winner**: f={top} ranks first but is not told apart from "
            + ", ".join(f"f={f}" for f in unresolved)
            + f" {holm}."
        )
    return f"{lead} Claims that hold: {said}."


def _shape(all_rows: list[FactorRow], result: Comparison) -> str:
    """Paper's Table 8 (PSNR falls with f) and Figure 6 (f=4..16 beat f=1 and f=32)."""
    psnr = [(r.factor, _mean([x.psnr for x in r.all_seeds])) for r in all_rows]
    psnr = [(f, p) for f, p in psnr if p is not None]
    if len(psnr) < 2:
        out = "PSNR trend: too few autoencoders to tell."
    elif all(a[1] >= b[1] for a, b in zip(psnr, psnr[1:], strict=False)):
        out = f"PSNR falls with f as in the paper ({psnr[0][1]:.3g} dB at f={psnr[0][0]} to {psnr[-1][1]:.3g} dB at f={psnr[-1][0]})."
    else:
        out = "PSNR does not fall monotonically with f (" + ", ".join(f"f={f}: {p:.3g}" for f, p in psnr) + ")."
    mid = [f for f in PAPER_MID if f in result.scores]
    ext = [f for f in PAPER_EXTREMES if f in result.scores]
    if not mid or not ext:
        return out + " Mid-range vs extremes: needs scores for some f in 4..16 and f=1 or f=32."
    pairs = [(m, e) for m in mid for e in ext]
    claimed = {(d.better, d.worse) for d in result.claims}
    names = " and ".join(f"f={e}" for e in ext)
    if all(pair in claimed for pair in pairs):
        return out + f" The paper's shape holds beyond the noise: every f in 4..16 beats {names}."
    against = sorted((e, m) for m, e in pairs if (e, m) in claimed)
    if against:
        said = ", ".join(f"f={e} beats f={m}" for e, m in against)
        return out + f" Against the paper's shape, beyond the noise: {said}."
    # (Where the means fall is no evidence: at this noise two replications can order them either way.)
    held = sum(pair in claimed for pair in pairs)
    return (
        out + f" The paper's shape (every f in 4..16 below {names}) is not settled at this noise: "
        f"{held} of its {len(pairs)} pairs differ beyond it."
    )


def _task_shape(summary: SweepSummary) -> str:
    """What the paper says for a task given an image (it chose f=4 without a sweep of f), and
    which factors do better than the task's baseline."""
    if summary.task == "superres":
        paper = (
            "Task: super-resolution by concatenation (Table 5); the paper used f=4 without sweeping f "
            "(Table 11 compares only f=1 and f=4), so no shape from the paper is checked here."
        )
    else:
        paper = (
            "Task: inpainting by concatenation (Tables 6-7); the paper compared only f=1 and f=4 (Table 6), "
            "so no shape from the paper is checked here."
        )
    return " ".join(filter(None, [paper, _against_baseline(summary)]))


# task: (its measure, the baseline's, higher is better, what the measure is, what the baseline is)
BASELINES = {
    "superres": ("sr_psnr", "sr_psnr_bicubic", True, "PSNR", "bicubic upsampling"),
    "inpaint": (
        "mask_l1",
        "mask_l1_mean_fill",
        False,
        "L1 in the holes",
        "filling each hole with its image's mean colour",
    ),
}


def _against_baseline(summary: SweepSummary) -> str:
    """Which factors' mean task measure beats the baseline's (same images), if recorded."""
    measure, baseline, higher, what, against = BASELINES[summary.task]
    means = {}
    for row in summary.rows:
        ours = [x.task_metrics.get(measure) for x in row.all_seeds]
        theirs = [x.task_metrics.get(baseline) for x in row.all_seeds]
        if ours and None not in ours and None not in theirs:
            means[row.factor] = (sum(ours) / len(ours), sum(theirs) / len(theirs))
    if not means:
        return ""
    better = [f for f, (m, b) in means.items() if (m > b if higher else m < b)]
    if not better:
        return f"By {what}, **no factor beats {against}**, the baseline a model must beat."
    names = ", ".join(f"f={f}" for f in better)
    return f"By {what}, {names} beat {against} on average over seeds (a mean, not a test); the others do not."


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None and math.isfinite(v)]
    return sum(known) / len(known) if known else None
