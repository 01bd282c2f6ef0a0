"""DVC through its command line (its stable interface): init, remotes, add, push, version.

The data version is the md5 DVC records for ``data/`` in ``data.dvc``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from components.errors import UserError, disk_failure
from components.workspace import DATA_DIR, DATA_DVC, DVC_DIR, dvc_config

REMOTE_NAME = "latentlab"
DATA_VERSION = re.compile(r"[0-9a-f]{32}(\.dir)?")  # DVC's md5 of data/: the data version


def dvc(root: Path, *args: str) -> str:
    """Run ``dvc ARGS`` in ``root``; a failure becomes a ``UserError`` with DVC's own words."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()
        disk = disk_failure(RuntimeError(detail))
        if disk is not None:
            raise UserError(f"dvc {args[0]}: {disk}")
        if "codec can't encode" in detail:
            raise UserError(
                f"DVC writes its config files in ASCII only, and a path in `dvc {' '.join(args)}` is not ASCII. "
                "Give data.remote (and the project's folder, if the remote lies outside it) a path of ASCII letters."
            )
        raise UserError(f"dvc {' '.join(args)} failed in {root}:\n{detail}")
    return done.stdout


def ensure_repo(root: Path) -> None:
    """Make ``root`` a DVC repository if it is not one (inside git when git is there)."""
    if (root / DVC_DIR).is_dir():
        return
    in_git = subprocess.run(["git", "rev-parse", "--git-dir"], cwd=root, capture_output=True).returncode == 0
    dvc(root, "init", *([] if in_git else ["--no-scm"]))


def use_remote(root: Path, url: str, endpoint: str | None = None) -> bool:
    """Make ``url`` the default remote; return whether ``.dvc/config`` changed (to commit).

    A shared remote (``s3://...``, any URL) is written to ``.dvc/config``, which git tracks, so
    that a clone knows where to ``dvc pull`` from; a directory is this machine's and the
    endpoint may differ per machine: both go to ``.dvc/config.local``. Credentials for S3 come
    from the usual AWS variables or profiles, never from params.
    """
    section = f'remote "{REMOTE_NAME}"'
    local = _config(dvc_config(root, local=True)).get(section, {})
    changed = False
    if "://" in url:
        if _config(dvc_config(root)).get(section, {}).get("url") != url:
            dvc(root, "remote", "add", "--project", "--force", "--default", REMOTE_NAME, url)
            changed = True
        if "url" in local:  # an earlier directory remote would override it
            dvc(root, "remote", "modify", "--local", "--unset", REMOTE_NAME, "url")
    else:
        dvc(root, "remote", "add", "--local", "--force", "--default", REMOTE_NAME, _relative(root / url, root))
    if endpoint:
        if local.get("endpointurl") != endpoint:
            dvc(root, "remote", "modify", "--local", REMOTE_NAME, "endpointurl", endpoint)
    elif "endpointurl" in local:
        dvc(root, "remote", "modify", "--local", "--unset", REMOTE_NAME, "endpointurl")
    return changed


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root``, as DVC stores a local path (relative to its config file):
    what the two share, such as a project folder named with non-ASCII letters, is left out of
    the config, which DVC (configobj) can write in ASCII only; the project can also move."""
    return os.path.relpath(Path(path).resolve(), Path(root).resolve())


def _config(path: Path) -> dict:
    """A DVC config file as nested dicts (DVC's own format, read with DVC's own reader)."""
    from configobj import ConfigObj

    return ConfigObj(str(path)).dict() if path.exists() else {}


def add(root: Path, target: str = str(DATA_DIR)) -> str:
    dvc(root, "add", target)
    return version(root, f"{target}.dvc")


def push(root: Path, target: str = str(DATA_DIR)) -> None:
    dvc(root, "push", "--remote", REMOTE_NAME, f"{target}.dvc")


AWS_S3 = "https://s3.amazonaws.com"


def unreachable(url: str, endpoint: str | None, timeout: float = 3.0) -> str | None:
    """Why the remote cannot be reached within ``timeout`` seconds (DVC itself would retry for
    minutes), or None. Probed: the explicit endpoint (MinIO, a local S3); for ``s3://`` without
    one, the endpoint boto3 would use (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, else AWS).
    Other remotes (a directory, ssh, gs, ...) are left to DVC."""
    if not endpoint and url.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or AWS_S3
    if "://" not in url or not endpoint:
        return None
    parsed = urlsplit(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as exc:
        return f"{parsed.hostname}:{port} does not answer ({exc.strerror or type(exc).__name__})"
    return None


def version(root: Path, dvc_file: str | Path = DATA_DVC) -> str | None:
    """The md5 recorded for the tracked output, or None when there is no such file yet."""
    path = root / dvc_file
    if not path.exists():
        return None
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def is_up_to_date(root: Path, dvc_file: str | Path = DATA_DVC) -> bool:
    """True when the workspace holds exactly what ``dvc_file`` records."""
    if not (root / dvc_file).exists():
        return False
    try:
        return json.loads(dvc(root, "status", "--json", str(dvc_file)) or "{}") == {}
    except (UserError, json.JSONDecodeError):
        return False


def check_version(data_version: str) -> str:
    """``data_version`` if it is one: it comes from a run's tag, which anyone with access to the
    store can edit, and it becomes a folder name ("/elsewhere" would run `dvc init` there)."""
    if not DATA_VERSION.fullmatch(str(data_version)):
        raise UserError(
            f"{str(data_version)[:80]!r} is not a data version (DVC's md5 of data/, 32 hex digits and .dir): the "
            "run's latentlab.data_version tag was edited or damaged; use another run."
        )
    return data_version


def restore(data_version: str, workspace: Path, *, cache_dir: Path, remote: str, endpoint: str | None = None) -> Path:
    """Check out data version ``data_version`` into ``workspace/data`` (a separate DVC project that
    shares ``cache_dir`` and the remote), leaving the user's own ``data/`` untouched."""
    check_version(data_version)
    workspace = Path(workspace)
    workspace.mkdir(parents=True, exist_ok=True)
    if version(workspace) == data_version and is_up_to_date(workspace):
        return workspace / DATA_DIR
    if not (workspace / DVC_DIR).is_dir():
        dvc(workspace, "init", "--no-scm", "-q")
    dvc(workspace, "config", "--local", "cache.dir", _relative(Path(cache_dir), workspace))
    use_remote(workspace, remote, endpoint)
    (workspace / DATA_DVC).write_text(
        yaml.safe_dump({"outs": [{"md5": data_version, "hash": "md5", "path": str(DATA_DIR)}]})
    )
    try:
        dvc(workspace, "pull", "--remote", REMOTE_NAME, str(DATA_DVC))
    except UserError as exc:
        raise UserError(
            f"Data version {data_version} is neither in the DVC cache ({cache_dir}) nor on the remote {remote}: "
            "point data.remote (and data.remote_endpoint) at the remote it was pushed to.\n" + str(exc)
        ) from None
    return workspace / DATA_DIR
