"""A full disk and a read-only project, on real file systems: a small tmpfs mounted over the
project in a mount namespace of the command's own (``unshare``), so nothing outside it sees the
mount and a crash leaves none behind. Each ends in one message with the fix, exit 2, no traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def in_a_mount(project: Path, size: str, *, read_only: bool, args: list[str]) -> subprocess.CompletedProcess[str]:
    """``latentlab ARGS`` in ``project``, a tmpfs of ``size`` (mounted read-only if told)."""
    project.mkdir()
    unshare = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--map-root-user", "--mount"]
    script = f'mount -t tmpfs -o size={size} tmpfs "$1" || exit 99\n'
    if read_only:
        script += 'mount -o remount,ro "$1" || exit 99\n'
    script += 'cd "$1" && shift && exec "$@"\n'
    latentlab = shutil.which("latentlab", path=os.path.dirname(sys.executable))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [*unshare, "bash", "-c", script, "bash", str(project), latentlab, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture
def data_command(repo: Path) -> list[str]:
    return ["data", "--params", str(repo / "params/smoke.yaml")]


@pytest.mark.parametrize("size", ["400k", "3m"], ids=["no room for the images", "no room for the DVC cache"])
def test_a_full_disk_is_one_message_with_the_fix(tmp_path, data_command, size):
    done = in_a_mount(tmp_path / "project", size, read_only=False, args=data_command)
    assert done.returncode != 99, f"could not mount a tmpfs here: {done.stderr}"
    said = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2, said[-2000:]
    assert "the disk is full" in said and "free some space" in said and "Traceback" not in said


def test_a_read_only_project_is_one_message_with_the_fix(tmp_path, data_command):
    done = in_a_mount(tmp_path / "project", "1m", read_only=True, args=data_command)
    assert done.returncode != 99, f"could not mount a tmpfs here: {done.stderr}"
    said = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2, said[-2000:]
    assert "read-only file system" in said and "folder you can write to" in said and "Traceback" not in said
