"""The sweep comparison report: the verdict, the Markdown table and the plots of a
``SweepSummary`` (``components.sweep_summary`` reads it from MLflow).

The verdict's statistics are ``components.verdict``'s; this module lays the report out.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from components import budget_curves  # noqa: E402
from components.comparison import Comparison  # noqa: E402
from components.contract import TASK_METRICS, TASK_TITLES  # noqa: E402
from components.store import UI_ADDRESS, run_page  # noqa: E402
from components.sweep_summary import FactorRow, SweepSummary  # noqa: E402
from components.verdict import comparable, comparison, verdict  # noqa: E402
from components.workspace import write_atomically  # noqa: E402

DASH = "—"
PLOTS = ("kid_vs_training_time.png", "kid_vs_throughput.png", "psnr_kid_vs_f.png", "samples_by_factor.png")


# ------------------------------------------------------------------------------------------- report


def write_report(summary: SweepSummary, out_dir: Path) -> Path:
    """Write report.md and its four PNGs into ``out_dir``; return the report's path. The verdict
    comes first, then the tables with their legends, where the sweep came from, and the plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    standings = budget_standings(summary.rows)
    _plot_budget_curves(summary, standings, out_dir / PLOTS[0])
    _plot_kid_vs_throughput(summary, out_dir / PLOTS[1])
    _plot_psnr_kid(summary, out_dir / PLOTS[2])
    grid = _samples_by_factor(summary)
    write_atomically(out_dir / PLOTS[3], lambda partial: grid.save(partial, format="PNG"))
    day = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(summary.started_ms / 1000))
    link = f"[{summary.run_id}]({run_page(summary.experiment_id, summary.run_id)})"
    lines = [
        f"# Compression factor ablation{_task_title(summary)}, {summary.run_name}",
        "",
        f"{day}, sweep run {link}.",
        "",
        "## Verdict",
        "",
        verdict(summary),
        "",
        budget_curves.ranking_changes(standings),
        "",
        "## Results",
        "",
        *_table(summary),
        "",
        *QUALITY_LEGEND,
        "",
        *_task_table(summary),
        *_unfinished(summary.rows),
        *_seeds_table(summary.rows),
        "## Cost",
        "",
        *_cost_table(summary.rows),
        "",
        *COST_LEGEND,
        "",
        "## Provenance",
        "",
        *provenance(summary),
        "",
        "## Plots",
        "",
        f"![KID vs LDM training time (Figure 6)]({PLOTS[0]})",
        "",
        f"![KID vs sampling throughput over DDIM steps (Figure 7)]({PLOTS[1]})",
        "",
        f"![PSNR and KID vs f]({PLOTS[2]})",
        "",
        f"![Final samples per factor]({PLOTS[3]})",
        "",
    ]
    # Atomically, each file: another command may be reading or uploading this folder meanwhile.
    return write_atomically(
        out_dir / "report.md", lambda partial: partial.write_text("\n".join(lines), encoding="utf-8")
    )


def budget_standings(rows: list[FactorRow]) -> list[budget_curves.Standing]:
    """The factors the verdict compares, compared along their budget curves."""
    return budget_curves.standings(comparable(rows)[1])


def provenance(summary: SweepSummary) -> list[str]:
    """Where the sweep came from, as Markdown bullets: enough to judge and rerun it."""
    commit = f"`{summary.commit[:10]}`" if summary.commit else "not recorded"
    dirty = " with uncommitted changes (the exact code is not in git)" if summary.dirty else ""
    rows = [r for r in summary.rows if r.runs]
    samples = sorted({r.n_samples for r in rows if r.n_samples is not None})
    reference = sorted({r.n_reference for r in rows if r.n_reference is not None})
    counts = (
        f"{'/'.join(map(str, samples))} samples per factor against {'/'.join(map(str, reference))} reference images"
        if samples and reference
        else f"{summary.params.get('eval.samples', '?')} samples per factor (eval.samples)"
    )
    split = "/".join(sorted({r.reference_split for r in rows if r.reference_split})) or "not recorded"
    extractors = sorted({r.fid_extractor for r in rows if r.fid_extractor})
    return [
        f"- **Parameters that differ from params/default.yaml**, as the command that runs them again: {_command(summary)}",
        f"- **Code:** commit {commit}{dirty}",
        f"- **Machine:** {summary.machine or 'not recorded'}",
        f"- **Precision:** {_precisions(rows) or 'not recorded'}",
        f"- **Evaluation:** {counts} (reference split: {split}), features "
        + (", ".join(f"`{e}`" for e in extractors) or "not recorded"),
        f"- **Data version:** `{summary.data_version or 'unknown'}`",
        f"- **Budget:** {summary.budget or 'not recorded'}",
    ]


def _command(summary: SweepSummary) -> str:
    """The command that runs these parameters again, from the recorded commit's defaults."""
    if summary.changed_params is None:
        return "not recorded (the sweep run's parameters hold them all)"
    words = ["latentlab", "sweep"]
    if summary.experiment != "latentlab":
        words += ["--experiment", summary.experiment]
    for key, value in summary.changed_params.items():
        words += ["--set", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return f"`{shlex.join(words)}`"


def _precisions(rows: list[FactorRow]) -> str:
    """``autoencoder bf16-mixed (f=2..32); ldm 32-true (f=1, 2), bf16-mixed (f=16, 32)``."""
    parts = []
    for stage in ("autoencoder", "ldm"):
        by_value: dict[str, list[int]] = {}
        for r in rows:
            if stage in r.trained_in:
                by_value.setdefault(r.trained_in[stage], []).append(r.factor)
        if by_value:
            each = ", ".join(f"{v} (f={', '.join(map(str, fs))})" for v, fs in by_value.items())
            parts.append(f"{stage} {each}")
    return "; ".join(parts)


def _unfinished(rows: list[FactorRow]) -> list[str]:
    """A line per factor that did not finish, with why: its cells above are blank."""
    left = [r for r in rows if r.status != "finished"]
    if not left:
        return []
    return [*(f"- f={r.factor} did not finish: {_cell(r.status)}" for r in left), ""]


def log_report(
    sweep_run_id: str, out_dir: Path, summary: SweepSummary, client: mlflow.MlflowClient | None = None
) -> None:
    """Attach the report to the sweep run, next to the runs it summarises: report.md and its plots
    under ``report/``, the table as an MLflow table (sortable in the UI's artifact view), each
    factor's metrics as ``by_f/<metric>`` at step = f, so the sweep run's own charts plot every
    metric against f with no setup, and the plots as images beside those charts."""
    client = client or mlflow.MlflowClient()
    client.log_artifacts(sweep_run_id, str(out_dir), artifact_path="report")
    client.log_table(sweep_run_id, data=factor_table(summary.rows), artifact_file="report/factors.json")
    log_by_factor(sweep_run_id, summary.rows, client)
    for name in PLOTS:
        with Image.open(Path(out_dir) / name) as plot:
            client.log_image(sweep_run_id, plot.convert("RGB"), key=f"report/{Path(name).stem}", step=0)


# by_f/<metric> on the sweep run <- the FactorRow attribute it comes from
BY_FACTOR = {
    "fid": "fid", "fid_ci_low": "fid_ci_low", "fid_ci_high": "fid_ci_high", "kid_mean": "kid_mean",
    "fid_inf": "fid_inf",
    "psnr": "psnr", "ssim": "ssim", "rfid": "rfid", "precision": "precision", "recall": "recall",
    "train_img_per_s": "ldm_img_per_s", "ae_train_img_per_s": "ae_img_per_s", "sample_img_per_s": "sample_img_per_s",
    "wall_time_s": "wall_time_s",
}  # fmt: skip


def by_factor(rows: list[FactorRow]) -> dict[str, dict[int, float]]:
    """``by_f/<metric>`` -> {f: value}; with several seeds, the mean over them; ``by_f/p_best``:
    the verdict's probability that f is best."""
    out: dict[str, dict[int, float]] = {}
    for name, attr in BY_FACTOR.items():
        for r in rows:
            spread = _mean_std([getattr(x, attr) for x in r.all_seeds])
            if spread is not None:
                out.setdefault(f"by_f/{name}", {})[r.factor] = spread[0]
    for r in rows:
        for name in r.task_metrics:
            if "_ci_" not in name:
                spread = _mean_std([x.task_metrics.get(name) for x in r.all_seeds])
                if spread is not None:
                    out.setdefault(f"by_f/{name}", {})[r.factor] = spread[0]
    result = comparison(rows)
    if result is not None:
        out["by_f/p_best"] = dict(result.p_best)
    return out


def log_by_factor(sweep_run_id: str, rows: list[FactorRow], client: mlflow.MlflowClient) -> None:
    """Log ``by_factor`` on the sweep run, leaving out points it already has (a report rebuilt
    from the same runs adds nothing; MLflow would otherwise keep both)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    new = []
    for key, values in by_factor(rows).items():
        have = {(m.step, m.value) for m in client.get_metric_history(sweep_run_id, key)}
        new += [Metric(key, v, now, f) for f, v in sorted(values.items()) if (f, v) not in have]
    for start in range(0, len(new), 1000):  # log_batch's limit
        client.log_batch(sweep_run_id, metrics=new[start : start + 1000])


def factor_table(rows: list[FactorRow]) -> dict[str, list]:
    """The report's table as columns of plain values (for ``log_table``): numbers stay numbers,
    so the UI sorts them."""
    columns: dict[str, list] = {"f": [r.factor for r in rows], "status": [r.status for r in rows]}
    for name, attr in BY_FACTOR.items():
        columns[name] = [getattr(r, attr) for r in rows]
    columns["kid_std"] = [r.kid_std for r in rows]
    columns["ldm_steps"] = [r.ldm_steps for r in rows]
    columns["latent"] = [r.latent_shape for r in rows]
    columns["fid_extractor"] = [r.fid_extractor for r in rows]
    for stage in dict.fromkeys(stage for r in rows for stage in r.runs):  # every stage any factor ran
        columns[f"{stage}_run"] = [r.runs.get(stage) for r in rows]
    return columns


COLUMNS = (
    "f", "latent", "PSNR ↑", "rFID ↓", "KID ↓", "P(best)", "FID ↓", "FID∞ ↓", "precision ↑", "recall ↑", "runs",
)  # fmt: skip
QUALITY_LEGEND = (
    "Each cell is the mean over the factor's trained models (seeds; see Across seeds). "
    "**latent**: the shape the LDM diffuses in (channels x height x width; f = 1 is pixel space). "
    "**PSNR** (dB) and **rFID**: the autoencoder's reconstructions of held-out images (the paper's Table 8). "
    "**KID**: samples against the reference images in the extractor's features (see Provenance), unbiased in "
    "the number of samples; the verdict ranks by it. Its [low, high] is the 95 % interval over seeds (training "
    "and evaluation noise), or with one seed the bootstrap over that model's samples, which holds no training "
    "noise. **P(best)**: the probability that the factor has the lowest KID. **FID** is biased upward at these "
    "sample counts (it grows as N shrinks); **FID∞** extrapolates it to infinitely many samples (Chong & "
    "Forsyth 2020), with one seed its 95 % interval. **precision** (fidelity) and **recall** (coverage). "
    "**runs**: the factor's MLflow runs (autoencoder, LDM, evaluate; a number for a later seed), opened in "
    f"`latentlab ui` (default {UI_ADDRESS}) or the tracking server. "
    "↑ higher is better, ↓ lower is better; — not recorded.",
)
COST_COLUMNS = ("f", "LDM steps", "LDM img/s ↑", "AE img/s ↑", "sample img/s ↑", "training time", "FLOPs/step")
COST_LEGEND = (
    "The LDM's training steps (what the budget allowed; mean over seeds), training throughput of the LDM and "
    "the autoencoder (images per second, mean over training), sampling throughput at the evaluation's sampler "
    "steps, the wall time of both trainings, and the LDM's floating-point operations per training step. "
    "Throughput is the machine's (see Provenance).",
)
STAGE_LINKS = {"autoencoder": "ae", "ldm": "ldm", "evaluate": "eval"}


def _table(summary: SweepSummary) -> list[str]:
    result = comparison(summary.rows)
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in summary.rows:
        seeds = r.all_seeds
        if result is not None and r.factor in result.estimate:
            low, high = result.interval[r.factor]
            kid = f"{_fmt(result.estimate[r.factor], 3)} [{_fmt(max(low, 0.0), 2)}, {_fmt(high, 2)}]"
            p_best = f"{result.p_best[r.factor]:.2f}"
        else:
            kid, p_best = _with_interval(seeds, "kid_mean", "kid_ci_low", "kid_ci_high"), DASH
        fid = _with_interval(seeds, "fid", "fid_ci_low", "fid_ci_high")
        links = " ".join(
            f"[{STAGE_LINKS.get(stage, stage)}{i or ''}]({run_page(summary.experiment_id, run_id)})"
            for i, x in enumerate(seeds)
            for stage, run_id in x.runs.items()
        )
        cells = [
            str(r.factor),
            r.latent_shape or DASH,
            _fmt(_mean(seeds, "psnr"), 4),
            _fmt(_mean(seeds, "rfid"), 3),
            kid,
            p_best,
            fid,
            _with_interval(seeds, "fid_inf", "fid_inf_ci_low", "fid_inf_ci_high"),
            _fmt(_mean(seeds, "precision"), 2),
            _fmt(_mean(seeds, "recall"), 2),
            links or DASH,
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _task_title(summary: SweepSummary) -> str:
    if summary.task == "generate":
        return ""
    scale = summary.params.get("ldm.superres_scale", "4")
    return f" for {TASK_TITLES[summary.task]}" + (f" x{scale}" if summary.task == "superres" else "")


def _task_table(summary: SweepSummary) -> list[str]:
    """The task's own measures per f (``tasks.TASK_METRICS``): the mean over seeds, with one seed
    the bootstrap interval over its images where recorded."""
    measures = TASK_METRICS.get(summary.task, ())
    if not measures:
        return []
    out = [
        f"### {TASK_TITLES[summary.task].capitalize()} measures",
        "",
        "| f | " + " | ".join(f"{label} {'↑' if higher else '↓'}" for _, label, higher in measures) + " |",
        "|" + "---|" * (len(measures) + 1),
    ]
    for r in summary.rows:
        cells = []
        for name, _, _ in measures:
            spread = _mean_std([x.task_metrics.get(name) for x in r.all_seeds])
            one = r.task_metrics
            cell = DASH if spread is None else _fmt(spread[0], 4)
            if spread is not None and spread[2] == 1 and f"{name}_ci_low" in one:
                cell += f" [{_fmt(one[f'{name}_ci_low'], 4)}, {_fmt(one[f'{name}_ci_high'], 4)}]"
            elif spread is not None and spread[2] > 1:
                cell += f" ± {_fmt(spread[1], 2)}"
            cells.append(cell)
        out.append(f"| {r.factor} | " + " | ".join(cells) + " |")
    return [*out, "", TASK_LEGENDS[summary.task], ""]


TASK_LEGENDS = {
    "generate": "How quality holds beyond the training size (the paper's Section 4.3.2): samples from a latent "
    "twice as large on each side, scored by KID of one crop of the training size each, against the same reference "
    "as KID above (compare the two columns). With one seed, [low, high] is the 95 % bootstrap interval over crops; "
    "with more, ± the standard deviation over seeds.",
    "superres": "The evaluation's outputs against the high-resolution originals of the images their low-resolution "
    "inputs were made from (the paper's Table 5); **bicubic PSNR**: those inputs upsampled bicubically, the baseline "
    "a model must beat. With one seed, [low, high] is the 95 % bootstrap interval over images; with more, ± the "
    "standard deviation over seeds. KID above is of the outputs, as FID in Table 5.",
    "inpaint": "The error inside the holes of the completed images (known pixels are kept), on [0, 1] pixel values; "
    "**mean-colour fill**: each hole filled with the mean colour of its image's known pixels, the baseline a model "
    "must beat (pixel errors reward a blur, and this is the blurriest fill). "
    "KID above is of the completed images (the paper's Table 7 reports FID of them). With one seed, [low, high] "
    "is the 95 % bootstrap interval over images; with more, ± the standard deviation over seeds.",
}


def _with_interval(seeds: list[FactorRow], value: str, low: str, high: str) -> str:
    """The mean over seeds; with one seed, its own interval where recorded."""
    mean = _mean(seeds, value)
    if mean is None:
        return DASH
    one = seeds[0]
    if len(seeds) == 1 and getattr(one, low) is not None and getattr(one, high) is not None:
        return f"{_fmt(mean, 3)} [{_fmt(getattr(one, low), 3)}, {_fmt(getattr(one, high), 3)}]"
    return _fmt(mean, 3)


def _mean(seeds: list[FactorRow], attr: str) -> float | None:
    spread = _mean_std([getattr(x, attr) for x in seeds])
    return None if spread is None else spread[0]


def _mean_std(values: list[float | None]) -> tuple[float, float, int] | None:
    """Mean, sample standard deviation (0 for one value) and count of the recorded values."""
    known = [v for v in values if v is not None and math.isfinite(v)]
    if not known:
        return None
    mean = sum(known) / len(known)
    var = sum((v - mean) ** 2 for v in known) / (len(known) - 1) if len(known) > 1 else 0.0
    return mean, math.sqrt(var), len(known)


def _cost_table(rows: list[FactorRow]) -> list[str]:
    out = ["| " + " | ".join(COST_COLUMNS) + " |", "|" + "---|" * len(COST_COLUMNS)]
    for r in rows:
        steps = _mean(r.all_seeds, "ldm_steps")
        cells = [
            str(r.factor),
            DASH if steps is None else f"{steps:,.0f}",
            _fmt(r.ldm_img_per_s, 3),
            _fmt(r.ae_img_per_s, 3),
            _fmt(r.sample_img_per_s, 3),
            _duration(r.wall_time_s),
            _si(r.flops_per_step),
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


SEED_COLUMNS = (("KID", "kid_mean", 3), ("FID", "fid", 3), ("FID∞", "fid_inf", 3), ("PSNR", "psnr", 4))


def _seeds_table(rows: list[FactorRow]) -> list[str]:
    """Mean ± std over the sweep's seeds (``sweep.seeds`` > 1): how much of a difference between
    factors a different seed alone makes (training noise). Empty for a single-seed sweep."""
    if not any(r.repeats for r in rows):
        return []
    header = ["f", "seeds", *(f"{name} mean ± std" for name, _, _ in SEED_COLUMNS), "per seed KID"]
    out = ["## Across seeds", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r.factor), ", ".join(DASH if x.seed is None else str(x.seed) for x in r.all_seeds)]
        for _, attr, digits in SEED_COLUMNS:
            spread = _mean_std([getattr(x, attr) for x in r.all_seeds])
            cells.append(
                DASH if spread is None else f"{_fmt(spread[0], digits)} ± {_fmt(spread[1], 2)} (n={spread[2]})"
            )
        cells.append(", ".join(_fmt(x.kid_mean, 3) for x in r.all_seeds))
        out.append("| " + " | ".join(cells) + " |")
    return [*out, ""]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _fmt(value: float | None, digits: int) -> str:
    """``digits`` significant figures, plain notation for everyday magnitudes."""
    if value is None or not math.isfinite(value):
        return DASH
    if value == 0 or 1e-4 <= abs(value) < 1e6:
        decimals = max(digits - 1 - math.floor(math.log10(abs(value))), 0) if value else 0
        return f"{value:,.{decimals}f}"
    return f"{value:.{digits - 1}e}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _si(value: float | None) -> str:
    if value is None:
        return DASH
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g}"


# -------------------------------------------------------------------------------------------- plots


def _save(fig: plt.Figure, ax: plt.Axes, path: Path, empty: bool, legend: bool = True) -> None:
    if empty:
        ax.text(0.5, 0.5, "no data recorded", ha="center", va="center", transform=ax.transAxes, color="grey")
    elif legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomically(path, lambda partial: fig.savefig(partial, dpi=110, format="png"))
    plt.close(fig)


def _plot_budget_curves(summary: SweepSummary, found: list[budget_curves.Standing], path: Path) -> None:
    """Each factor's mean KID over seeds against its LDM's training minutes, seeds as in ``_seed_spread``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    factors = sorted({f for s in found for f in s.comparison.estimate})
    for f in factors:
        at = [s for s in found if f in s.comparison.estimate]
        minutes = [s.train_s_of[f] / 60 for s in at]
        (line,) = ax.plot(minutes, [s.comparison.estimate[f] for s in at], marker="o", markersize=4, label=f"f={f}")
        for x, s in zip(minutes, at, strict=True):
            _seed_spread(ax, s.comparison, f, x, line.get_color())
    seeds = bool(found) and all(s.comparison.training_noise_measured for s in found)
    extractor = comparable(summary.rows)[0]
    title = "KID vs LDM training time (Figure 6)" + (": mean, dots each seed" if seeds else ", one seed")
    title += f"\nfeatures: {extractor}" if extractor else ""
    ax.set(xlabel="LDM training (min, batches only)", ylabel="KID", title=title)
    ax.grid(alpha=0.3)
    _save(fig, ax, path, not factors)


def _seed_spread(ax: plt.Axes, result: Comparison, f: int, x: float, color: str) -> None:
    """At ``x``, each seed's KID as a dot (a t interval over 2-3 seeds is too wide to read as a
    picture; the tables have it), or with one seed its evaluation's bootstrap interval."""
    if result.training_noise_measured:
        ax.scatter([x] * len(result.scores[f]), result.scores[f], s=12, color=color, alpha=0.5)
    else:
        mean, (low, high) = result.estimate[f], result.interval[f]
        ax.errorbar(
            [x], [mean], yerr=[[max(mean - low, 0)], [max(high - mean, 0)]], fmt="none", ecolor=color, capsize=3
        )


def _plot_kid_vs_throughput(summary: SweepSummary, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    extractor = comparable(summary.rows)[0]
    rows = [r for r in summary.rows if r.ddim]
    for r in rows:
        _, kids, speeds = zip(*r.ddim, strict=True)
        other = extractor is not None and r.fid_extractor != extractor  # dotted: not comparable with the rest
        label = f"f={r.factor}" + (f" [{r.fid_extractor or 'unrecorded'}]" if other else "")
        (line,) = ax.plot(speeds, kids, marker="o", linestyle=":" if other else "-", label=label)
        for s, kid, speed in r.ddim:
            ax.annotate(
                str(s), (speed, kid), fontsize=7, xytext=(3, 3), textcoords="offset points", color=line.get_color()
            )
    if rows:
        ax.set_xscale("log")
    title = "KID vs sampling throughput, labels = DDIM steps (Figure 7)"
    ax.set(xlabel="samples / s", ylabel="KID", title=title + (f"\nfeatures: {extractor}" if extractor else ""))
    ax.grid(alpha=0.3, which="both")
    _save(fig, ax, path, not rows)


def _plot_psnr_kid(summary: SweepSummary, path: Path) -> None:
    """PSNR (reconstruction) and the verdict's KID with its intervals (generation) against f."""
    fig, ax = plt.subplots(figsize=(6, 4))
    factors = [r.factor for r in summary.rows]
    psnr = [(r.factor, _mean(r.all_seeds, "psnr")) for r in summary.rows]
    psnr = [(f, p) for f, p in psnr if p is not None]
    extractor = comparable(summary.rows)[0]
    result = comparison(summary.rows)  # KID only from one extractor, as in the verdict
    if psnr:
        ax.plot(*zip(*psnr, strict=True), marker="o", color="tab:blue", label="PSNR (autoencoder)")
    ax.set_ylabel("PSNR (dB)", color="tab:blue")
    twin = ax.twinx()
    if result is not None:
        kid = sorted(result.estimate.items())
        label = "KID (evaluate; line: mean, dots: each seed)"
        if not result.training_noise_measured:
            label = "KID (evaluate, one seed: its bootstrap interval)"
        twin.plot(*zip(*kid, strict=True), marker="s", color="tab:red", label=label)
        for f, _ in kid:
            _seed_spread(twin, result, f, f, "tab:red")
    twin.set_ylabel(f"KID [{extractor}]" if extractor else "KID", color="tab:red")
    if factors and min(factors) > 0:
        ax.set_xscale("log", base=2)
        ax.set_xticks(factors, [str(f) for f in factors])
        ax.minorticks_off()
    ax.set(xlabel="downsampling factor f", title="Reconstruction vs generation quality")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="best")
    _save(fig, ax, path, not psnr and result is None, legend=False)


def _samples_by_factor(summary: SweepSummary, caption: int = 24, pad: int = 8) -> Image.Image:
    """Each factor's final sample grid side by side, captioned "f=8"; a grey placeholder where none."""
    rows = summary.rows
    images = [r.samples for r in rows]
    height = max((im.height for im in images if im is not None), default=64)
    tiles = [im if im is not None else _placeholder(height) for im in images]
    width = sum(t.width for t in tiles) + pad * (len(tiles) + 1)
    canvas = Image.new("RGB", (max(width, 200), height + caption + pad), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=16)
    x = pad
    for r, tile in zip(rows, tiles, strict=True):
        draw.text((x + tile.width // 2, caption // 2), f"f={r.factor}", fill="black", font=font, anchor="mm")
        canvas.paste(tile, (x, caption))
        x += tile.width + pad
    if not rows:
        draw.text((10, caption // 2), "no factors recorded", fill="grey", font=font, anchor="lm")
    return canvas


def _placeholder(height: int) -> Image.Image:
    tile = Image.new("RGB", (max(height // 2, 64), height), (235, 235, 235))
    font = ImageFont.load_default(size=12)
    ImageDraw.Draw(tile).text((tile.width // 2, height // 2), "no samples", fill="grey", font=font, anchor="mm")
    return tile
