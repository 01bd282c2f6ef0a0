"""End to end: the data flow in a real git+DVC repository, MLflow on its default SQLite store."""

import json
import os
import shutil
import socket
import subprocess
import sys

import boto3
import mlflow
import pytest
import yaml
from PIL import Image

from components import dvc
from components.errors import UserError
from components.presets import load_params
from flows.data import data_flow

pytestmark = pytest.mark.slow


def folder_params(path, *extra):
    return load_params(None, ["data.source=folder", f"data.path={path}", "data.resolution=32", *extra])


def data_runs(_root=None):
    return mlflow.search_runs(experiment_names=["latentlab"], output_format="list")


def test_folder_is_versioned_reported_and_recorded(project, tmp_path, write_folder, git):
    images = tmp_path / "images"
    write_folder(images)
    result = data_flow(folder_params(images))

    dvc_file = yaml.safe_load((project / "data.dvc").read_text())
    assert result.version == dvc_file["outs"][0]["md5"]
    assert dvc.is_up_to_date(project)
    skipped = {s["file"]: s["reason"] for s in result.manifest["skipped"]}
    assert set(skipped) == {"notes.txt", "cats/corrupt.png", "dogs/empty.png", "cats/truncated.png"}
    assert result.manifest["counts"]["total"] == 6
    assert result.manifest["classes"] == ["cats", "dogs"]
    assert len(list((project / "data" / "images").rglob("*.png"))) == 6
    assert all(Image.open(p).size == (32, 32) for p in (project / "data" / "images").rglob("*.png"))
    assert (project / "dvc-remote").is_dir()  # pushed to the default local remote

    (run,) = data_runs(project)
    assert run.info.run_id == result.run_id
    assert run.data.tags["latentlab.stage"] == "data"
    assert run.data.tags["latentlab.data_version"] == result.version
    assert run.data.tags["mlflow.source.git.commit"] == git(project, "rev-parse", "HEAD").strip()
    assert run.data.params["data.source"] == "folder"
    assert run.data.metrics["n_total"] == 6 and run.data.metrics["n_skipped"] == 4
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"manifest.json", "samples_per_class.png"} <= artifacts
    assert run.info.artifact_uri.startswith((project / "mlartifacts").as_uri()), run.info.artifact_uri
    (dataset,) = run.inputs.dataset_inputs  # the UI's Dataset column: the DVC version and its remote
    assert (dataset.dataset.name, dataset.dataset.digest) == (f"data-{result.version[:8]}", result.version)
    assert dataset.dataset.source_type == "local" and "dvc-remote" in dataset.dataset.source

    # Again: nothing changes, no second run, even when the state file was left damaged.
    before = (project / "data.dvc").read_bytes()
    (project / ".latentlab" / "data-state.json").write_text('{"fingerpr')
    again = data_flow(folder_params(images))
    assert again.version == result.version and again.run_id == result.run_id
    assert (project / "data.dvc").read_bytes() == before
    assert len(data_runs(project)) == 1

    # New content, new version; the old one stays in the DVC cache.
    Image.new("RGB", (40, 40), "white").save(images / "dogs" / "d9.png")
    changed = data_flow(folder_params(images))
    assert changed.version != result.version
    assert changed.manifest["counts"]["total"] == 7
    assert len(data_runs(project)) == 2


def test_strict_mode_refuses_before_writing(project, tmp_path, write_folder):
    images = tmp_path / "images"
    write_folder(images)
    shutil.rmtree(images / "dogs")
    (images / "notes.txt").unlink()
    good = data_flow(folder_params(images))
    (images / "cats" / "broken.png").write_bytes(b"garbage")

    with pytest.raises(UserError) as caught:
        data_flow(folder_params(images, "data.strict=true"))
    assert "cats/broken.png" in str(caught.value) and "cats/corrupt.png" in str(caught.value)
    assert dvc.version(project) == good.version and dvc.is_up_to_date(project)
    assert len(data_runs(project)) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_reported(project, tmp_path, write_folder):
    images = tmp_path / "images"
    write_folder(images)
    (images / "cats" / "c1.png").chmod(0)
    result = data_flow(folder_params(images))
    assert "permission" in {s["file"]: s["reason"] for s in result.manifest["skipped"]}["cats/c1.png"]


def test_openmoji_is_deterministic_across_projects(project, tmp_path):
    params = load_params(None, ["data.resolution=8", "data.max_per_class=3", "ae.factor=8"])
    first = data_flow(params)
    other = tmp_path / "other"
    shutil.copytree(
        project,
        other,
        ignore=shutil.ignore_patterns("data", "mlflow.db", "mlartifacts", "dvc-remote", ".latentlab", "data.dvc"),
    )
    os.chdir(other)
    second = data_flow(params, root=other)
    assert second.version == first.version
    assert first.manifest["counts"]["total"] == 3 * len(first.manifest["classes"])
    assert "Smileys & Emotion" in first.manifest["classes"]


def test_s3_remote(project, tmp_path, monkeypatch, write_folder, git):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing-key",
            "AWS_SECRET_ACCESS_KEY": "testing-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(key, value)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="datasets")
        images = tmp_path / "images"
        write_folder(images)
        result = data_flow(
            folder_params(images, "data.remote=s3://datasets/latentlab", f"data.remote_endpoint={endpoint}")
        )
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="datasets")["Contents"]]
        assert len(keys) >= 7  # six images, metadata, manifest and the directory listing
        assert all(k.startswith("latentlab/") for k in keys)
        (run,) = data_runs(project)
        logged = json.dumps([run.data.params, run.data.tags])
        assert "testing-secret" not in logged and "testing-key" not in logged
        assert result.version

        # The remote's URL is in the committed config, the endpoint in the local one: a fresh
        # clone that names only its own endpoint pulls the version.
        assert "s3://datasets/latentlab" in (project / ".dvc" / "config").read_text()
        assert endpoint in (project / ".dvc" / "config.local").read_text()
        git(project, "add", ".dvc/config", "data.dvc")
        git(project, "commit", "-q", "-m", "data")
        clone = tmp_path / "clone"
        subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
        pull = [sys.executable, "-m", "dvc"]
        subprocess.run(
            [*pull, "remote", "modify", "--local", "latentlab", "endpointurl", endpoint], cwd=clone, check=True
        )
        subprocess.run([*pull, "pull", "-q"], cwd=clone, check=True)
        assert sorted(p.name for p in (clone / "data" / "images").rglob("*.png")) == sorted(
            p.name for p in (project / "data" / "images").rglob("*.png")
        )
    finally:
        server.stop()


def test_an_unreachable_remote_leaves_the_version_local_and_the_work_going(project, tmp_path, write_folder):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    images = tmp_path / "images"
    write_folder(images)
    params = folder_params(images, "data.remote=s3://datasets/x", f"data.remote_endpoint=http://127.0.0.1:{port}")
    result = data_flow(params)
    assert result.version == yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    assert (project / ".dvc" / "cache").is_dir()  # the version is kept locally, to push later
    (run,) = data_runs(project)
    assert run.data.tags["latentlab.data_version"] == result.version


def test_an_s3_remote_without_endpoint_is_probed_where_boto3_would_go(monkeypatch):
    from components import dvc

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    assert f"127.0.0.1:{port} does not answer" in dvc.unreachable("s3://bucket/data", None)
    assert dvc.unreachable("dvc-remote", None) is None  # a directory: nothing to probe


def test_cli_reports_bad_files_by_name(project, tmp_path, repo, cli, write_folder):
    images = tmp_path / "images"
    write_folder(images)
    done = cli(
        project,
        "data",
        "--params",
        str(repo / "params/default.yaml"),
        "--set",
        "data.source=folder",
        "--set",
        f"data.path={images}",
        "--set",
        "data.resolution=32",
    )
    assert done.returncode == 0, done.stderr
    assert "cats/corrupt.png" in done.stderr and "notes.txt" in done.stderr
    assert done.stdout.strip().splitlines()[-1] == dvc.version(project)

    strict = cli(
        project,
        "data",
        "--set",
        "data.source=folder",
        "--set",
        f"data.path={images}",
        "--set",
        "data.resolution=32",
        "--set",
        "data.strict=true",
    )
    assert strict.returncode == 2
    assert "cats/corrupt.png" in strict.stderr and "Traceback" not in strict.stderr


def test_a_project_folder_named_in_non_ascii_letters_versions_and_restores_in_the_c_locale(
    tmp_path, write_folder, repo, monkeypatch
):
    """DVC writes its config files in ASCII (configobj), in every locale: the absolute remote and
    cache paths through a folder named 'prüf' failed ("'ascii' codec can't encode"). They go in
    relative to the project, where the folder's own name is not written."""
    root = tmp_path / "prüf ü"
    root.mkdir()
    images = tmp_path / "images"
    write_folder(images)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"LC_ALL": "C", "LANG": "C"}
    settings = ["data.source=folder", f"data.path={images}", "data.resolution=32"]
    command = [shutil.which("latentlab", path=os.path.dirname(sys.executable)), "data"]
    command += ["--params", str(repo / "params/default.yaml"), *(a for s in settings for a in ("--set", s))]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    version = done.stdout.strip().splitlines()[-1]
    assert "prüf" not in (root / ".dvc" / "config.local").read_text() and (root / "dvc-remote").is_dir()

    monkeypatch.setenv("LC_ALL", "C")  # (for the DVC processes the restore starts)
    checkout = root / ".latentlab" / "data-versions" / "v"
    restored = dvc.restore(version, checkout, cache_dir=root / ".dvc" / "cache", remote=str(root / "dvc-remote"))
    assert sorted(p.name for p in restored.rglob("*.png")) == sorted(p.name for p in (root / "data").rglob("*.png"))
