"""Evaluation, the sweep, its report and reproduce, end to end on a tiny OpenMoji subset."""

import datetime
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from PIL import Image

from components import workspace
from components.errors import UserError
from components.first_stage import FirstStageRef
from flows.pipeline import evaluate_flow, ldm_flow, sweep_flow
from flows.reproduce import reproduce_flow
from flows.sample import sample_flow


def runs(stage: str) -> list[mlflow.entities.Run]:
    return mlflow.search_runs(
        experiment_names=["latentlab"], filter_string=f"tags.`latentlab.stage` = '{stage}'", output_format="list"
    )


@pytest.mark.slow
def test_evaluate_logs_metrics_and_reuses_reference_statistics(project, tiny):
    params = tiny()
    ldm = ldm_flow(params)
    ldm_run = mlflow.get_run(ldm.run_id)
    kid_steps = [m.step for m in mlflow.MlflowClient().get_metric_history(ldm.run_id, "kid_mean")]
    assert kid_steps == [2, 4]  # at each half of the budget, the last at the end (Figure 6)
    assert {"kid_ci_low", "kid_ci_high", "train_s", "kid_by_train_s"} <= set(ldm_run.data.metrics)
    assert ldm_run.data.tags["latentlab.fid_extractor"].startswith("latentlab-cnn:")

    result = evaluate_flow(params, ldm.run_id)
    run = mlflow.get_run(result.run_id)
    metrics, tags = run.data.metrics, run.data.tags
    assert {"fid", "kid_mean", "kid_std", "precision", "recall", "sample_img_per_s", "psnr", "rfid"} <= set(metrics)
    assert metrics["fid"] > 0 and 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert tags["latentlab.stage"] == "evaluate" and tags["latentlab.ldm_run_id"] == ldm.run_id
    assert tags["latentlab.fid_extractor"] == ldm_run.data.tags["latentlab.fid_extractor"]
    assert tags["latentlab.small_sample"] == "true" and "biased" in tags["latentlab.small_sample_note"]
    curve = mlflow.MlflowClient().get_metric_history(result.run_id, "ddim_fid")
    assert sorted(m.step for m in curve) == [2, 4]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id)}
    assert {"samples.png", "kid_vs_throughput.png", "ddim_curve.json"} <= artifacts

    # The extractor was trained once for this data version and logged with its own run.
    (extractor_run,) = [r for r in runs("evaluate") if r.data.tags.get("latentlab.role") == "feature-extractor"]
    assert extractor_run.data.tags["latentlab.fid_extractor"] == tags["latentlab.fid_extractor"]

    cached = sorted(project.glob(".latentlab/fidelity-cache/**/*"))
    stamps = {p: p.stat().st_mtime_ns for p in cached if p.is_file()}
    assert stamps, "reference statistics were not cached"
    again = evaluate_flow(params, ldm.run_id)
    assert again.reused and again.run_id == result.run_id
    other = evaluate_flow(tiny("eval.samples=12"), ldm.run_id)
    assert not other.reused
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # the real images' features were reused


@pytest.mark.slow
def test_evaluate_refuses_what_it_cannot_evaluate(project, tiny):
    with pytest.raises(UserError, match="No MLflow run"):
        evaluate_flow(tiny(), "0123456789abcdef")


@pytest.mark.slow
def test_sweep_marks_a_failed_factor_redoes_only_it_then_reuses_everything(project, tiny, monkeypatch):
    params = tiny()
    from flows.data import data_flow

    version = data_flow(params).version
    pixels = FirstStageRef.pixels(version, params.data.resolution).id
    poisoned = project / workspace.latent_cache(pixels)  # f=1's latent cache: a folder in its place
    poisoned.mkdir(parents=True)  # (a damaged file would be encoded again; this cannot be replaced)
    state = sweep_flow(params, return_state=True)
    assert state.is_failed() and state.message.startswith("f=1 did not finish")  # in Prefect: Failed
    assert _task_run_states(state.state_details.flow_run_id) == {
        "factor-f1-seed0": "FAILED",
        "factor-f4-seed0": "COMPLETED",
    }
    first = state.result(raise_on_failure=False)
    assert list(first.failed) == ["f=1"]
    tags = mlflow.get_run(first.run_id).data.tags
    assert json.loads(tags["latentlab.sweep.f1"])["status"].startswith("failed")
    finished_f4 = json.loads(tags["latentlab.sweep.f4"])
    assert finished_f4["status"] == "finished"

    poisoned.rmdir()
    result = sweep_flow(params)
    assert not result.failed and result.run_id == first.run_id
    sweep = mlflow.get_run(result.run_id)
    assert json.loads(sweep.data.tags["latentlab.sweep.f4"]) == finished_f4  # not redone
    assert sweep.info.status == "FINISHED" and sweep.data.tags["latentlab.stage"] == "sweep"
    assert sweep.data.tags["latentlab.budget"].startswith("equal steps")
    for factor in (1, 4):
        entry = json.loads(sweep.data.tags[f"latentlab.sweep.f{factor}"])
        evaluation = mlflow.get_run(entry["evaluate"])
        assert evaluation.data.tags["mlflow.parentRunId"] == result.run_id
        assert evaluation.data.params["ae.factor"] == str(factor) and "fid" in evaluation.data.metrics
        ldm = mlflow.get_run(entry["ldm"])
        assert ldm.info.run_name == f"ldm-f{factor}" and ldm.data.tags["mlflow.parentRunId"] == result.run_id
        assert {"steps", "images_seen", "wall_time_s", "flops_per_step"} <= set(ldm.data.metrics)
        assert ldm.data.metrics["steps"] == 4
    assert "autoencoder" not in json.loads(sweep.data.tags["latentlab.sweep.f1"])  # pixel space: no autoencoder run
    # The registry follows the sweep: ldm@f4 is the version it evaluated (f=1 has no pipeline to register).
    client = mlflow.MlflowClient()
    f4 = json.loads(sweep.data.tags["latentlab.sweep.f4"])["ldm"]
    assert client.get_model_version_by_alias("ldm", "f4").run_id == f4
    assert set(client.get_registered_model("ldm").aliases) <= {"f4", "best"}
    # Any registered version samples, at twice the training size too (the denoiser is convolutional).
    paths = sample_flow(params, "models:/ldm@f4", project / "twice", size=2, count=3)
    assert [p.name for p in paths] == ["0000.png", "0001.png", "0002.png"]
    assert {Image.open(p).size for p in paths} == {(2 * params.data.resolution,) * 2}
    assert {"kid_2x", "kid_2x_ci_low", "kid_2x_ci_high"} <= set(mlflow.get_run(entry["evaluate"]).data.metrics)

    report = project / result.report.parent  # (relative to the project)
    assert report.parent == project / "reports" and report.name.endswith(f"-sweep-{sweep.info.run_id[:8]}")
    text = (report / "report.md").read_text()
    assert "| 1 |" in text and "| 4 |" in text and "Verdict" in text
    assert all((report / name).stat().st_size > 0 for name in ("kid_vs_training_time.png", "kid_vs_throughput.png"))
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "report")}
    assert "report/report.md" in logged

    counts = {stage: len(runs(stage)) for stage in ("autoencoder", "ldm", "evaluate", "sweep")}
    assert counts["autoencoder"] == 1 and counts["sweep"] == 1
    started = time.perf_counter()
    again = sweep_flow(params)
    assert again.reused and again.run_id == result.run_id
    assert time.perf_counter() - started < 30
    assert {stage: len(runs(stage)) for stage in counts} == counts
    assert result.regressions == [] and "latentlab.compared_with" not in sweep.data.tags  # nothing before it


@pytest.mark.slow
def test_sweep_repeats_each_factor_per_seed_reports_the_spread_and_flags_what_got_worse_beyond_it(
    project, tiny, monkeypatch
):
    params = tiny("sweep.factors=[4]", "sweep.seeds=2")
    result = sweep_flow(params)
    assert not result.failed and set(result.entries) == {(4, 0), (4, 1)}
    sweep = mlflow.get_run(result.run_id)
    tags = ("latentlab.sweep.f4", "latentlab.sweep.f4.r1")
    entries = [json.loads(sweep.data.tags[name]) for name in tags]
    ldms = [mlflow.get_run(entry["ldm"]) for entry in entries]
    assert [r.data.tags["latentlab.seed"] for r in ldms] == ["0", "1"]
    assert [r.info.run_name for r in ldms] == ["ldm-f4", "ldm-f4-seed1"]
    evaluations = [mlflow.get_run(entry["evaluate"]) for entry in entries]
    extractors = {r.data.tags["latentlab.fid_extractor"] for r in evaluations}
    assert len(extractors) == 1  # every seed is scored by the same network
    assert evaluations[0].data.metrics["fid"] != evaluations[1].data.metrics["fid"]
    text = (project / result.report).read_text()
    assert "## Across seeds" in text and "over 2 trained model(s) per factor" in text
    assert result.regressions == [] and "latentlab.compared_with" not in sweep.data.tags  # nothing before it

    # The nightly signal, on the verdict's basis: the same data and parameters under new code (a
    # new sweep, every stage reused, its models now scoring KID 0.300 and 0.302) against a previous
    # sweep whose two f=4 models scored 0.010 and 0.011: worse beyond the seeds' spread, so marked,
    # and Failed when asked.
    client = mlflow.MlflowClient()
    for evaluation, kid in zip(evaluations, (0.300, 0.302), strict=True):
        client.log_metric(evaluation.info.run_id, "kid_mean", kid)
    extractor = {"latentlab.fid_extractor": extractors.pop()}
    for tag, entry, kid in zip(tags, entries, (0.010, 0.011), strict=True):
        with mlflow.start_run(run_name="eval-f4-better", tags=extractor) as fake:  # (no stage tags: never reused)
            mlflow.log_metrics({"kid_mean": kid, "fid": 1.0})
        client.set_tag(result.run_id, tag, json.dumps({**entry, "evaluate": fake.info.run_id}))
    monkeypatch.setattr("flows.sweep.SweepStage.key", lambda stage: "new-code-" + stage.data.version[:8])
    state = sweep_flow(params, fail_on_regression=True, return_state=True)
    assert state.is_failed() and state.message.startswith("worse than the previous sweep: f=4: KID 0.301 over 2 seeds")
    nightly = mlflow.get_run(state.result(raise_on_failure=False).run_id)
    assert nightly.info.run_id != result.run_id and nightly.data.tags["latentlab.compared_with"] == result.run_id
    assert nightly.data.tags["latentlab.regression.f4"].startswith("f=4: KID 0.301 over 2 seeds, was 0.0105 over 2")


@pytest.mark.slow
def test_stopped_sweep_resumes_without_duplicates(project, repo, tiny_sweep):
    command = [str(Path(sys.executable).with_name("latentlab")), "sweep", "--params", str(repo / "params/smoke.yaml")]
    for setting in tiny_sweep:
        command += ["--set", setting]
    started = datetime.datetime.now(datetime.UTC)
    process = subprocess.Popen(
        command, cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 400
    while time.time() < deadline and not any(r.info.status == "FINISHED" for r in _safe_runs("evaluate", "eval-f1")):
        time.sleep(0.5)
    assert process.poll() is None, "the sweep ended before it could be killed"
    os.kill(process.pid, signal.SIGTERM)  # as `kill` or a scheduler stops it: promptly, not after f=4
    assert process.wait(timeout=60) != 0
    # What it leaves says stopped: MLflow runs KILLED with the reason, Prefect flow runs Cancelled.
    every = [run for stage in ("data", "sweep", "autoencoder", "ldm", "evaluate") for run in _all_runs(stage)]
    stopped = {
        r.info.run_name: r.data.tags.get("latentlab.closed_reason") for r in every if r.info.status != "FINISHED"
    }
    assert "sweep" in " ".join(stopped) and set(stopped.values()) == {"stopped by TerminationSignal"}, stopped
    assert all(r.info.status in ("FINISHED", "KILLED") for r in every)
    states = _flow_run_states(since=started)
    assert states["sweep"] == {"CANCELLED"} and "RUNNING" not in set().union(*states.values()), states

    done = subprocess.run(command, cwd=project, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep,) = runs("sweep")
    assert sweep.info.status == "FINISHED"
    names = sorted(r.info.run_name for stage in ("ldm", "evaluate") for r in runs(stage))
    assert names == [
        "eval-f1",
        "eval-f4",
        "extractor-" + sweep.data.tags["latentlab.data_version"][:8],
        "ldm-f1",
        "ldm-f4",
    ]


@pytest.mark.slow
def test_two_sweeps_started_together_in_one_directory_write_every_run_once(project, repo, tiny_sweep):
    command = [str(Path(sys.executable).with_name("latentlab")), "sweep", "--params", str(repo / "params/smoke.yaml")]
    for setting in [*tiny_sweep, "sweep.factors=[4]"]:
        command += ["--set", setting]
    first = subprocess.Popen(command, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    second = subprocess.Popen(command, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = [process.communicate(timeout=600)[0] for process in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    trained = next(o for o in outputs if "LDM training started" in o)  # a log file's view of it
    assert "latentlab - f=4 (1/1) LDM training started; sweep ETA " in trained
    noise = ("Tip", "litlogger", "LeafSpec", "deprecated", "Finished in state", "it/s]")
    assert not [word for word in noise if word in "".join(outputs)]
    by_stage = {stage: runs(stage) for stage in ("data", "sweep", "autoencoder", "ldm", "evaluate")}
    assert {stage: len(found) for stage, found in by_stage.items()} == {
        "data": 1,
        "sweep": 1,
        "autoencoder": 1,
        "ldm": 1,
        "evaluate": 2,  # eval-f4 and the domain extractor's run
    }
    assert all(run.info.status == "FINISHED" for found in by_stage.values() for run in found)
    client = mlflow.MlflowClient()
    for model in client.search_registered_models():
        assert len(client.search_model_versions(f"name = '{model.name}'")) == 1, model.name


def _running(stage: str, name_prefix: str) -> bool:
    return any(r.info.status == "RUNNING" and r.info.run_name.startswith(name_prefix) for r in _all_runs(stage))


# Where a sweep can be killed, in the order a sweep reaches them. A check recognises the moment
# from outside; None: tests/killpoint.py holds the process there (too quick to catch).
KILL_POINTS = {
    "data build": lambda project: (project / workspace.lock_file("data-build")).exists(),  # render, dvc add, push
    "extractor training": lambda project: _running("evaluate", "extractor-"),
    "autoencoder publish": None,  # trained, nothing published
    "model download": None,  # the first stage downloaded for the LDM, not yet renamed into place
    "latent cache write": None,  # half the cache's temporary file written
    "LDM training": lambda project: bool(list(project.glob(".latentlab/checkpoints/ldm-*/last.ckpt"))),
    "LDM publish": None,  # trained, nothing published
    "evaluation": lambda project: _running("evaluate", "eval-f4"),
    "report": lambda project: any(project.glob("reports/*-sweep-*")),  # the sweep run still open
}


@pytest.mark.slow
def test_a_sweep_killed_at_each_point_in_turn_finishes_with_each_run_once_and_none_left_running(
    project, repo, tiny_sweep
):
    """kill -9 at every point of one sweep: each rerun recovers from the last kill and runs on to
    the next point; the last one finishes as a clean sweep would (one run per key, same steps)."""
    arguments = ["sweep", "--params", str(repo / "params/smoke.yaml")]
    for setting in [*tiny_sweep, "sweep.factors=[4]", "ldm.checkpoint_every=1"]:
        arguments += ["--set", setting]
    marker = project / "killed-at"
    for point, reached in KILL_POINTS.items():
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("killpoint.py")), point, *arguments],
            cwd=project,
            env={**os.environ, "LATENTLAB_KILL_MARKER": str(marker)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        seen = reached or (lambda project: marker.exists())
        deadline = time.time() + 300
        while not seen(project) and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, f"the rerun ended before its {point} was seen"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        marker.unlink(missing_ok=True)

    done = subprocess.run(
        [str(Path(sys.executable).with_name("latentlab")), *arguments],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    every = [run for stage in ("data", "sweep", "autoencoder", "ldm", "evaluate") for run in _all_runs(stage)]
    assert [r.info.run_name for r in every if r.info.status != "FINISHED"] == []  # resumed, none orphaned
    keys = [(r.data.tags["latentlab.stage"], r.data.tags["latentlab.run_key"]) for r in every]
    assert len(keys) == len(set(keys))  # one run per key: nothing trained or evaluated twice
    (ae,) = _all_runs("autoencoder")
    (ldm,) = _all_runs("ldm")
    assert (ae.data.metrics["steps"], ldm.data.metrics["steps"]) == (6, 4)  # a clean run's: no batch more
    client = mlflow.MlflowClient()
    for model in client.search_registered_models():
        assert len(client.search_model_versions(f"name = '{model.name}'")) == 1, model.name
    assert list(project.glob("reports/*-sweep-*/report.md"))  # and the report, whole


def _flow_run_states(since: datetime.datetime) -> dict[str, set[str]]:
    """The states of the flow runs (by flow name) that started after ``since``."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStartTime

    with get_client(sync_client=True) as client:
        flow_names = {flow.id: flow.name for flow in client.read_flows()}
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since)))
    states: dict[str, set[str]] = {}
    for run in runs:
        states.setdefault(flow_names[run.flow_id], set()).add(run.state.type.value)
    return states


def _task_run_states(flow_run_id) -> dict[str, str]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run.state.type.value for run in task_runs if run.name.startswith("factor-")}


def _all_runs(stage: str) -> list:
    try:
        return runs(stage)
    except Exception:  # noqa: BLE001 (the database may not exist yet)
        return []


def _safe_runs(stage: str, name: str) -> list:
    try:
        return [r for r in runs(stage) if r.info.run_name == name]
    except Exception:  # noqa: BLE001 (the database may not exist yet)
        return []


@pytest.mark.slow
def test_reproduce_restores_the_data_version_and_matches(project, tiny, git):
    (project / "components").mkdir()
    (project / "components" / "code.py").write_text("x = 1\n")
    git(project, "add", "components")
    git(project, "commit", "-q", "-m", "code")
    params = tiny("ae.factor=4")
    from flows.pipeline import autoencoder_flow

    original = autoencoder_flow(params).autoencoder_run
    (project / "data" / "notes.txt").write_text("the user's data/ moved on since")  # not the run's version now
    data_hash = _tree_hash(project / "data")

    result = reproduce_flow(params, original)
    assert result.within_tolerance, result.comparisons
    assert {c.metric for c in result.comparisons} >= {"psnr", "ssim", "rfid"}
    run = mlflow.get_run(result.run_id)
    assert run.data.tags["latentlab.stage"] == "reproduce" and run.data.tags["latentlab.reproduces"] == original
    assert run.data.tags["latentlab.within_tolerance"] == "true"
    assert mlflow.get_run(result.new_run_id).data.tags["mlflow.parentRunId"] == result.run_id
    version = mlflow.get_run(original).data.tags["latentlab.data_version"].removesuffix(".dir")
    assert (project / ".latentlab" / "data-versions" / version / "data" / "manifest.json").exists()
    assert _tree_hash(project / "data") == data_hash  # the user's data/ untouched

    (project / "components" / "code.py").write_text("x = 2\n")
    with pytest.raises(UserError, match="--allow-code-change"):
        reproduce_flow(params, original)


def test_reproduce_of_an_ldm_run_scores_with_the_runs_own_extractor_and_matches(project, tiny):
    original = ldm_flow(tiny("ae.factor=4"))
    extractor = mlflow.get_run(original.run_id).data.tags["latentlab.fid_extractor"]
    # The caller's evaluation settings differ (a longer-trained extractor): the run's own are used.
    result = reproduce_flow(tiny("ae.factor=4", "eval.extractor_steps=25"), original.run_id)
    assert result.within_tolerance, result.comparisons
    assert {"kid_mean", "train_loss"} <= {c.metric for c in result.comparisons}  # (KID during training)
    assert mlflow.get_run(result.new_run_id).data.tags["latentlab.fid_extractor"] == extractor
    assert len([r for r in runs("evaluate") if r.data.tags.get("latentlab.role") == "feature-extractor"]) == 1


def test_a_missing_data_version_is_a_clear_error(tmp_path):
    from components import dvc

    with pytest.raises(UserError, match="neither in the DVC cache"):
        dvc.restore("0" * 32 + ".dir", tmp_path / "ws", cache_dir=tmp_path / "cache", remote=str(tmp_path / "remote"))


def _tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()
