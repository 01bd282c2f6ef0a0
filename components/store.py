"""The tracking store before MLflow is imported: where it is, whether it can be used, and a
glance at one run in it. Importing MLflow takes 2-3 s on this CPU, so the command line checks
these here and a mistyped run id or a dead server comes back in about a second. (Everything
else about runs goes through MLflow: ``components.tracking``, ``components.runs``.)
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from components.contract import TAG_STAGE
from components.credentials import redact
from components.errors import InfrastructureError, UserError
from components.workspace import TRACKING_DB

DEFAULT_EXPERIMENT = "latentlab"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else ``mlflow.db`` in the working directory (made absolute so a
    later change of directory cannot point the same process at another database)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


UI_ADDRESS = "http://127.0.0.1:5000"  # where ``latentlab ui`` serves a local store by default


def ui_address(uri: str | None = None) -> str:
    """Where a person opens the runs of this store: a tracking server's own address (without
    credentials), else what ``latentlab ui`` serves a local store on."""
    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return UI_ADDRESS
    parts = urlsplit(uri)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", "")).rstrip("/")


def run_page(experiment_id: str, run_id: str, uri: str | None = None) -> str:
    """The MLflow UI page of one run."""
    return f"{ui_address(uri)}/#/experiments/{experiment_id}/runs/{run_id}"


def default_uri() -> str:
    """``mlflow.db`` in the working directory. A path holding ``?`` or ``%`` is refused: SQLAlchemy
    ends the database's path at ``?`` and decodes ``%XX`` (the store would land outside the
    project), and MLflow creates the undecoded folder if the path is encoded."""
    path = str(TRACKING_DB.resolve())
    if "?" in path or "%" in path:
        raise UserError(
            f"The project folder {Path.cwd()} has '?' or '%' in its path, which the SQLite store's URI cannot "
            "hold (mlflow.db would land elsewhere): rename or move it, or set MLFLOW_TRACKING_URI."
        )
    return f"sqlite:///{path}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for any other store)."""
    return Path(unquote(uri.removeprefix("sqlite:///"))) if uri.startswith("sqlite:///") else None


def check_store(uri: str | None = None) -> None:
    """Fail in seconds, naming the fix, when the tracking store cannot be used: a server that
    does not answer (MLflow itself would retry for minutes) or a database file that is not one
    (``InfrastructureError``)."""
    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        except requests.RequestException as exc:
            raise InfrastructureError(
                f"The MLflow tracking server {redact(uri)} does not answer ({type(exc).__name__}): start it "
                f"(see the README), or unset MLFLOW_TRACKING_URI to use {TRACKING_DB} in this directory."
            ) from None
    elif (path := sqlite_path(uri)) is not None:
        header = b""
        if path.is_file():
            with path.open("rb") as handle:
                header = handle.read(16)
        if header and header != b"SQLite format 3\x00":
            raise InfrastructureError(
                f"{path} is not an SQLite database, so it cannot be the MLflow store: move it aside "
                "(a new one is created) or point MLFLOW_TRACKING_URI at the store you meant."
            )


def check_prefect_server(api_url: str) -> None:
    """Fail in seconds when the Prefect server at ``api_url`` (``PREFECT_API_URL``) does not
    answer, instead of Prefect's own retries."""
    import requests

    try:
        requests.get(api_url.rstrip("/") + "/health", timeout=5).raise_for_status()
    except requests.RequestException as exc:
        raise InfrastructureError(
            f"The Prefect server {redact(api_url)} does not answer ({type(exc).__name__}): start it "
            "(`prefect server start`) or point PREFECT_API_URL at one that runs."
        ) from None


@dataclass(frozen=True)
class RunGlance:
    """What a command checks about the run it names before any work starts."""

    exists: bool
    deleted: bool = False
    stage: str | None = None  # tag latentlab.stage


def glance(run_id: str, uri: str | None = None) -> RunGlance | None:
    """Run ``run_id`` as the store has it, read without MLflow: from an SQLite store's tables, or
    a tracking server's REST API. None where this cannot tell (another kind of store, a server
    that wants credentials, a schema it does not know): MLflow's client then decides."""
    uri = uri or tracking_uri()
    try:
        if (path := sqlite_path(uri)) is not None:
            return _from_sqlite(path, run_id)
        if uri.startswith(("http://", "https://")):
            return _from_server(uri, run_id)
    except (sqlite3.Error, OSError, ValueError, KeyError):
        return None
    return None


def _from_sqlite(path: Path, run_id: str) -> RunGlance:
    if not path.is_file():
        return RunGlance(exists=False)  # no store yet: no runs
    with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as db:
        row = db.execute(
            "SELECT r.lifecycle_stage, t.value FROM runs r LEFT JOIN tags t "
            "ON t.run_uuid = r.run_uuid AND t.key = ? WHERE r.run_uuid = ?",
            (TAG_STAGE, run_id),
        ).fetchone()
    return RunGlance(exists=False) if row is None else RunGlance(True, row[0] == "deleted", row[1])


def _from_server(uri: str, run_id: str) -> RunGlance | None:
    import requests

    answer = requests.get(f"{uri.rstrip('/')}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, timeout=5)
    if answer.status_code in (400, 404) and "RESOURCE_DOES_NOT_EXIST" in answer.text:
        return RunGlance(exists=False)
    if not answer.ok:
        return None
    run = answer.json()["run"]
    tags = {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}
    return RunGlance(True, run["info"]["lifecycle_stage"] == "deleted", tags.get(TAG_STAGE))


def check_run(run_id: str, seen: RunGlance, stages: tuple[str, ...], command: str) -> None:
    """A ``UserError`` saying what to pass instead, unless the run exists, is not deleted and is
    of one of ``stages``."""
    if not seen.exists:
        raise UserError(
            f"No MLflow run {run_id!r} in {redact(tracking_uri())}: `{command}` needs the id of a run of stage "
            f"{' or '.join(stages)} (see `latentlab ui`), or MLFLOW_TRACKING_URI set to the store that has it."
        )
    if seen.deleted:
        raise UserError(
            f"Run {run_id} was deleted: restore it (`mlflow runs restore --run-id {run_id}`, or the UI's "
            "trash) or pass another run."
        )
    if seen.stage not in stages:
        raise UserError(
            f"Run {run_id} is a {seen.stage or 'non-latentlab'} run: `{command}` needs a run of stage {' or '.join(stages)}."
        )
