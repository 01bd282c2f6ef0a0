"""The sweep report, built from a real (SQLite) MLflow store holding a fake but contract-shaped sweep."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Metric
from PIL import Image

from components import report, sweep_summary, verdict
from components.sweep_summary import BudgetPoint

EXTRACTOR = "latentlab-cnn:3f2a9c1d0e4b"
# f -> (psnr, fid, kid_mean); f=1 has no autoencoder, f=32 failed before its LDM.
NUMBERS = {1: (None, 80.0, 0.060), 4: (27.0, 42.0, 0.030), 8: (24.0, 35.0, 0.020), 32: (18.0, None, None)}


def _run(client, exp, name, stage, parent, factor=None, tags=None, metrics=None, histories=None, artifact=None):
    tags = {"latentlab.stage": stage, "latentlab.data_version": "abc123", **(tags or {})}
    if parent:
        tags["mlflow.parentRunId"] = parent
    if factor is not None:
        tags["latentlab.factor"] = str(factor)
    run_id = client.create_run(exp, run_name=name, tags=tags).info.run_id
    now = int(time.time() * 1000)
    batch = [Metric(k, v, now, 0) for k, v in (metrics or {}).items()]
    batch += [Metric(k, v, now + i, s) for k, points in (histories or {}).items() for i, (s, v) in enumerate(points)]
    client.log_batch(run_id, metrics=batch)
    if artifact:
        client.log_artifact(run_id, str(artifact))
    client.set_terminated(run_id)
    return run_id


def make_sweep(
    client, exp: str, tmp: Path, extractors: dict[int, str] | None = None, intervals: dict | None = None
) -> str:
    """A sweep over f in 1, 4, 8, 32 (f=32 failed, f=1 pixel space); ``extractors`` overrides per f;
    ``intervals``: f -> (fid_ci_low, fid_ci_high) recorded on its evaluation."""
    tmp.mkdir(parents=True, exist_ok=True)
    sweep = client.create_run(
        exp,
        run_name="sweep-3f2a",
        tags={
            "latentlab.stage": "sweep",
            "latentlab.data_version": "abc123",
            "latentlab.budget": "equal steps: ae 400, ldm 2000 per factor",
        },
    ).info.run_id
    client.log_param(sweep, "sweep.factors", "[1, 4, 8, 32]")
    for f, (psnr, fid, kid) in NUMBERS.items():
        ids = {"ae": "", "ldm": "", "evaluate": "", "status": "finished"}
        if f > 1:
            ae_metrics = {
                "psnr": psnr,
                "ssim": 0.9 - f / 100,
                "rfid": f / 4,
                "steps": 400,
                "images_seen": 12800,
                "wall_time_s": 60.0,
            }
            ids["ae"] = _run(
                client,
                exp,
                f"ae-f{f}",
                "autoencoder",
                sweep,
                f,
                {"latentlab.fid_extractor": EXTRACTOR},
                ae_metrics,
                {"train_img_per_s": [(1, 100.0), (2, 200.0)]},
            )
        if fid is None:
            ids["status"] = "failed: CUDA out of memory | at step 3"
        else:
            samples = tmp / "samples_final.png"
            Image.new("RGB", (96, 64), (f * 7, 100, 200)).save(samples)
            shape = "3x64x64" if f == 1 else f"4x{64 // f}x{64 // f}"
            ldm_metrics = {"steps": 2000, "images_seen": 64000, "wall_time_s": 240.0, "flops_per_step": 2.5e12 / f}
            curve = [(500, fid * 3), (1000, fid * 2), (2000, fid)]
            ldm_hist = {
                "kid_mean": [(s, v / 1000) for s, v in curve],
                "kid_ci_low": [(s, v / 2000) for s, v in curve],
                "kid_ci_high": [(s, v / 500) for s, v in curve],
                "train_s": [(s, s / 8) for s, _ in curve],
                "train_loss": [(1, 0.5), (2, 0.3)],
                "train_img_per_s": [(1, 10.0 * f), (2, 30.0 * f)],
            }
            ids["ldm"] = _run(
                client,
                exp,
                f"ldm-f{f}",
                "ldm",
                sweep,
                f,
                {"latentlab.latent_shape": shape, "latentlab.seed": "0"},
                ldm_metrics,
                ldm_hist,
                samples,
            )
            ev_tags = {
                "latentlab.fid_extractor": (extractors or {}).get(f, EXTRACTOR),
                "latentlab.small_sample": "true",
                "latentlab.reference_split": "val",
            }
            ev_metrics = {
                "fid": fid,
                "kid_mean": kid,
                "kid_std": 0.004,
                "precision": 0.6,
                "recall": 0.4,
                "sample_img_per_s": 5.0 * f,
            }
            if intervals and f in intervals:
                ev_metrics |= dict(zip(("fid_ci_low", "fid_ci_high"), intervals[f], strict=True))
                ev_metrics |= {"kid_ci_low": kid * 0.5, "kid_ci_high": kid * 1.5}
            ddim = {
                "ddim_fid": [(10, fid * 1.5), (20, fid * 1.2), (50, fid)],
                "ddim_kid_mean": [(10, kid * 1.5), (20, kid * 1.2), (50, kid)],
                "ddim_sample_img_per_s": [(10, 50.0 * f), (20, 25.0 * f), (50, 10.0 * f)],
            }
            ids["evaluate"] = _run(client, exp, f"eval-f{f}", "evaluate", sweep, f, ev_tags, ev_metrics, ddim)
        client.set_tag(sweep, f"latentlab.sweep.f{f}", json.dumps(ids))
    client.set_terminated(sweep)
    return sweep


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("report")
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    client = mlflow.MlflowClient()
    exp = client.create_experiment("latentlab", artifact_location=(tmp / "art").as_uri())
    yield client, exp, tmp
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def built(store):
    client, exp, tmp = store
    sweep = make_sweep(client, exp, tmp / "src")
    summary = sweep_summary.collect(sweep)  # default client: the tracking URI set above
    path = report.write_report(summary, tmp / "out")
    return sweep, summary, path


def _table_rows(text: str, section: str = "## Results", columns: tuple = report.COLUMNS) -> dict[int, dict[str, str]]:
    """The first table under ``section``, by f."""
    lines = text.split(section + "\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| f |"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("| ").replace("\\|", "¦").split(" | ")]
        rows[int(cells[0])] = dict(zip(columns, cells, strict=True))
    return rows


def test_table_has_one_row_per_factor_with_the_recorded_numbers(built):
    _, summary, path = built
    assert [r.factor for r in summary.rows] == [1, 4, 8, 32]
    eight = summary.rows[2]
    assert (eight.fid, eight.psnr, eight.ldm_steps, eight.latent_shape) == (35.0, 24.0, 2000, "4x8x8")
    assert eight.ldm_img_per_s == pytest.approx(160.0) and eight.ae_img_per_s == pytest.approx(150.0)
    assert eight.wall_time_s == 300.0 and eight.fid_extractor == EXTRACTOR and eight.small_sample
    assert eight.budget_curve == [
        BudgetPoint(500, 62.5, 0.105, 0.0525, 0.21),
        BudgetPoint(1000, 125.0, 0.07, 0.035, 0.14),
        BudgetPoint(2000, 250.0, 0.035, 0.0175, 0.07),
    ]
    assert [d[0] for d in eight.ddim] == [10, 20, 50] and eight.samples is not None
    text = path.read_text()
    assert "sweep-3f2a" in text and "abc123" in text and "equal steps: ae 400, ldm 2000 per factor" in text
    assert text.index("## Verdict") < text.index("## Results") < text.index("## Provenance")  # the verdict first
    assert "Budget curves (KID during training, 3 points): the most likely best is f=8 at 1/3 of the budget" in text
    rows = _table_rows(text)
    assert sorted(rows) == [1, 4, 8, 32]
    assert rows[8]["FID ↓"].startswith("35.0") and rows[8]["PSNR ↑"] == "24.00" and rows[8]["P(best)"] == "1.00"
    assert rows[1]["PSNR ↑"] == rows[1]["rFID ↓"] == "—" and rows[1]["latent"] == "3x64x64"
    assert rows[8]["latent"] == "4x8x8" and "lower is better" in text  # and a legend says what the columns are
    ids = summary.rows[2].runs
    assert rows[8]["runs"] == " ".join(  # each run linked to its page in the MLflow UI
        f"[{short}](http://127.0.0.1:5000/#/experiments/{summary.experiment_id}/runs/{ids[stage]})"
        for stage, short in (("autoencoder", "ae"), ("ldm", "ldm"), ("evaluate", "eval"))
    )
    cost = _table_rows(text, "## Cost", report.COST_COLUMNS)
    assert (
        cost[8]["training time"] == "5.0 min" and cost[8]["FLOPs/step"] == "312 G" and cost[8]["LDM steps"] == "2,000"
    )


def test_failed_factor_is_marked_and_left_blank(built):
    _, summary, path = built
    failed = summary.rows[3]
    assert failed.status.startswith("failed: CUDA out of memory") and failed.fid is None and failed.psnr == 18.0
    row = _table_rows(path.read_text())[32]
    assert row["FID ↓"] == "—" and row["latent"] == "—"
    assert "- f=32 did not finish: failed: CUDA out of memory \\| at step 3" in path.read_text()


def test_one_seed_leaves_training_noise_unmeasured_and_names_no_winner(built):
    _, summary, _ = built
    text = verdict.verdict(summary)
    assert "**Training noise is unmeasured**" in text and "no winner is named" in text and "beats" not in text
    assert "Probability of being best: f=8 1.00" in text  # evaluation noise only, here none recorded
    assert "PSNR falls with f" in text and "is not settled at this noise: 0 of its" in text
    assert EXTRACTOR in text and "FID from fewer than 5,000 samples is biased upward" in text
    assert "Left out" not in text


def test_mismatched_extractor_is_left_out_of_the_verdict(store):
    client, exp, tmp = store
    sweep = make_sweep(client, exp, tmp / "odd", extractors={4: "inception-v3-compat:abcd"})
    summary = sweep_summary.collect(sweep, client)
    text = verdict.verdict(summary)
    assert "Probability of being best: f=8 1.00 (the other 1 below 0.01)." in text  # f=1 and f=8 only
    assert (
        "Left out of the comparison: f=4 (`inception-v3-compat:abcd`)" in text and "different feature extractor" in text
    )
    assert report.write_report(summary, tmp / "odd_out").exists()


def test_plots_are_valid_images(built):
    _, _, path = built
    for name in report.PLOTS:
        assert f"]({name})" in path.read_text()
        with Image.open(path.parent / name) as image:
            image.verify()
            assert image.size[0] > 0 and image.size[1] > 0


def test_log_report_puts_the_comparison_on_the_sweep_run(built, store):
    client = store[0]
    sweep, summary, path = built
    report.log_report(sweep, path.parent, summary)
    logged = {a.path for a in client.list_artifacts(sweep, "report")}
    assert {"report/report.md", "report/kid_vs_training_time.png", "report/factors.json"} <= logged
    images = " ".join(a.path for a in client.list_artifacts(sweep, "images"))  # the plots, as UI images
    assert all(f"images/report~{Path(name).stem}+step+0" in images for name in report.PLOTS), images
    # each metric against f: step = f, one point per factor that has it (f=32 failed: no FID)
    fid = client.get_metric_history(sweep, "by_f/fid")
    assert sorted((m.step, m.value) for m in fid) == [(f, NUMBERS[f][1]) for f in (1, 4, 8)]
    psnr = {m.step: m.value for m in client.get_metric_history(sweep, "by_f/psnr")}
    assert psnr == {f: NUMBERS[f][0] for f in (4, 8, 32)}  # f=1 has no autoencoder
    assert {m.step for m in client.get_metric_history(sweep, "by_f/train_img_per_s")} == {1, 4, 8}
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{sweep}/report/factors.json"))
    rows = {row[table["columns"].index("f")]: row for row in table["data"]}
    assert set(rows) == {1, 4, 8, 32} and rows[8][table["columns"].index("fid")] == NUMBERS[8][1]

    report.log_report(sweep, path.parent, summary)  # rebuilt from the same runs: no second point
    assert len(client.get_metric_history(sweep, "by_f/fid")) == 3


def test_empty_sweep_does_not_crash(store):
    client, exp, tmp = store
    sweep = client.create_run(exp, run_name="sweep-empty", tags={"latentlab.stage": "sweep"}).info.run_id
    client.set_tag(
        sweep, "latentlab.sweep.f4", json.dumps({"ae": "deadbeef", "ldm": "", "evaluate": "", "status": "running"})
    )
    summary = sweep_summary.collect(sweep, client)
    assert [(r.factor, r.status, r.runs.get("autoencoder")) for r in summary.rows] == [(4, "running", None)]
    text = report.write_report(summary, tmp / "empty_out").read_text()
    assert "No factor has an evaluation KID yet" in text and "not recorded" in text


def test_one_seed_shows_its_own_intervals(store):
    client, exp, tmp = store
    intervals = {8: (30.0, 40.0), 4: (37.5, 47.0), 1: (70.0, 91.0)}
    summary = sweep_summary.collect(make_sweep(client, exp, tmp / "ci", intervals=intervals), client)
    row = _table_rows(report.write_report(summary, tmp / "ci_out").read_text())[8]
    assert row["FID ↓"].startswith("35.0 [30.0, 40.0]") and row["KID ↓"] == "0.0200 [0.010, 0.030]"
    assert 0.5 < verdict.comparison(summary.rows).p_best[8] < 1.0  # evaluation noise alone leaves f=4 a chance


def test_seeds_give_mean_and_std_and_a_verdict_across_them(store):
    client, exp, tmp = store
    sweep = make_sweep(client, exp, tmp / "seeds")
    # seed 0 is NUMBERS (f=4: 42, f=8: 35, f=1: 80; KID = FID / 1000); seed 2 alone ranks f=4 first
    more = {4: {1: 44.0, 2: 30.0}, 8: {1: 37.0, 2: 39.0}, 1: {1: 80.5, 2: 79.0}}
    for f, by_seed in more.items():
        for seed, fid in by_seed.items():
            ldm = _run(client, exp, f"ldm-f{f}-seed{seed}", "ldm", sweep, f, {"latentlab.seed": str(seed)})
            ev = _run(client, exp, f"eval-f{f}-seed{seed}", "evaluate", sweep, f, {"latentlab.fid_extractor": EXTRACTOR},
                      {"fid": fid, "kid_mean": fid / 1000})  # fmt: skip
            entry = {"ae": "", "ldm": ldm, "evaluate": ev, "status": "finished"}
            client.set_tag(sweep, f"latentlab.sweep.f{f}.r{seed}", json.dumps(entry))
    summary = sweep_summary.collect(sweep, client)
    four, eight = summary.rows[1], summary.rows[2]
    assert [r.seed for r in eight.all_seeds] == [0, 1, 2] and [r.fid for r in four.all_seeds] == [42.0, 44.0, 30.0]

    text = verdict.verdict(summary)
    assert "over 3 trained model(s) per factor" in text
    assert (
        "**No single winner**: f=8 ranks first but is not told apart from f=4 after Holm's correction over 3 pairs"
        in text
    )
    assert "Claims that hold: f=4 beats f=1; f=8 beats f=1." in text
    assert "The paper's shape holds beyond the noise: every f in 4..16 beats f=1." in text
    lines = report.write_report(summary, tmp / "seeds_out").read_text().splitlines()
    table = lines[lines.index("## Across seeds") + 2 :]
    four_row = next(line for line in table if line.startswith("| 4 |"))
    fid_spread = f"{statistics.mean([42, 44, 30]):.1f} ± {statistics.stdev([42, 44, 30]):.1f} (n=3)"
    assert "| 0, 1, 2 |" in four_row and fid_spread in four_row and "0.0300, 0.0440, 0.0300" in four_row


def test_the_provenance_block_says_where_the_sweep_came_from_and_how_to_run_it_again(store):
    client, exp, tmp = store
    sweep = make_sweep(client, exp, tmp / "provenance")
    changed = {
        "sweep.factors": [1, 4, 8, 32],
        "data.source": "folder",
        "data.path": "/my images",
        "ae.max_minutes": None,
    }
    for key, value in {
        "mlflow.source.git.commit": "0123456789abcdef",
        "latentlab.git_dirty": "true",
        "latentlab.machine": "AMD EPYC [avx512_bf16], 2 cores, 24 GiB, no GPU",
        "latentlab.changed_params": json.dumps(changed),
    }.items():
        client.set_tag(sweep, key, value)
    summary = sweep_summary.collect(sweep, client)
    for row in summary.rows[:3]:  # the finished factors
        client.set_tag(row.runs["ldm"], "latentlab.precision", "bf16-mixed" if row.factor == 8 else "32-true")
        for name, count in (("samples", 256.0), ("reference_images", 494.0)):
            client.log_metric(row.runs["evaluate"], name, count)
    summary = sweep_summary.collect(sweep, client)
    text = report.write_report(summary, tmp / "provenance_out").read_text()
    block = text.split("## Provenance\n", 1)[1].split("## Plots", 1)[0]
    assert "commit `0123456789` with uncommitted changes" in block
    assert "AMD EPYC [avx512_bf16], 2 cores, 24 GiB, no GPU" in block
    assert "ldm 32-true (f=1, 4), bf16-mixed (f=8)" in block
    assert "256 samples per factor against 494 reference images" in block and EXTRACTOR in block
    assert "`abc123`" in block and "equal steps: ae 400, ldm 2000 per factor" in block
    command = "latentlab sweep --set 'sweep.factors=[1, 4, 8, 32]' --set data.source=folder "
    command += "--set 'data.path=/my images' --set ae.max_minutes=null"
    assert f"`{command}`" in block  # one that the shell reads back to these parameters


def test_report_folders_sort_by_date(store):
    from components import workspace

    day = time.mktime((2026, 12, 5, 12, 0, 0, 0, 0, 0)) * 1000
    assert str(workspace.report_dir("0e3509111df240c994259141d02ee4b6", int(day))).endswith(
        "reports/2026-12-05-sweep-0e350911"
    )


def test_the_papers_shape_is_said_only_as_far_as_pairs_differ_beyond_the_noise():
    """Where the means fall is no evidence: two replications of the main job ordered f=16 and
    f=1 either way. The verdict says what the pairwise tests carry, nothing more."""
    from components.comparison import compare

    rows = [sweep_summary.FactorRow(f) for f in (1, 4, 8)]
    holds = compare({1: [0.50, 0.51, 0.52], 4: [0.10, 0.11, 0.10], 8: [0.20, 0.21, 0.20]})
    assert "The paper's shape holds beyond the noise: every f in 4..16 beats f=1." in verdict._shape(rows, holds)
    against = compare({1: [0.10, 0.11, 0.10], 4: [0.50, 0.52, 0.51], 8: [0.30, 0.31, 0.30]})
    assert "Against the paper's shape, beyond the noise: f=1 beats f=4, f=1 beats f=8." in verdict._shape(rows, against)
    unsettled = compare({1: [0.3, 0.1], 4: [0.2, 0.25], 8: [0.1, 0.35]})
    text = verdict._shape(rows, unsettled)
    assert "is not settled at this noise: 0 of its 2 pairs differ beyond it" in text and "means" not in text
