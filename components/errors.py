"""The exceptions the CLI shows as a short message instead of a traceback."""

import errno
import re
from urllib.parse import urlsplit

RESULT_NEUTRAL = True  # messages, never what a run computes: not part of any stage's code identity


class UserError(Exception):
    """Bad input or an unmet precondition the user can fix; the message says how."""


class InfrastructureError(UserError):
    """A service the platform relies on (the tracking store or server, its artifact store, the
    Prefect server) failed or did not answer: nothing is wrong with the input; rerun when it
    answers. The command line exits 3 on it, not 2."""


class Reported(Exception):
    """A failure already logged where it happened (a sweep's factor): it ends its Prefect run
    Failed, and its traceback would add nothing to the logged message."""


def store_failure(error: BaseException) -> str | None:
    """One line naming the server that failed, when ``error`` is MLflow's REST client giving up
    on the tracking server or its artifact store (no answer, or 5xx answers): worth a retry and
    a plain message, not a traceback. None for anything else."""
    text = str(error)
    if not (text.startswith("API request to ") and " failed with exception " in text):
        return None
    url, cause = text.removeprefix("API request to ").split(" failed with exception ", 1)
    caused = re.search(r"Caused by \w+\((.*)$", cause, re.DOTALL)
    reason = (caused.group(1) if caused else cause).rstrip("')\" \n").lstrip("'\" ").split(">: ")[-1]
    host = urlsplit(url).netloc.rpartition("@")[2]  # (without user:password@; the reason names no URL)
    return f"{host} did not answer ({reason[:160]})"


_DISK_ERRNOS = {errno.ENOSPC: "full", errno.EDQUOT: "full", errno.EROFS: "read-only"}
_DISK_TEXTS = {  # how SQLite and DVC say the same, when no OSError reaches us
    "database or disk is full": "full",
    "no space left on device": "full",
    "attempt to write a readonly database": "read-only",
    "read-only file system": "read-only",
}


def disk_failure(error: BaseException) -> str | None:
    """One line with the fix, when ``error`` (or what caused it) is a disk that is full or
    mounted read-only: the platform can do nothing about either, and a traceback adds nothing.
    None for anything else."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        kind, where = None, ""
        if isinstance(error, OSError) and error.errno in _DISK_ERRNOS:
            kind, where = _DISK_ERRNOS[error.errno], error.filename or ""
        else:
            text = str(error).lower()
            kind = next((k for t, k in _DISK_TEXTS.items() if t in text), None)
        if kind == "full":
            return (
                f"the disk is full{f' (writing {where})' if where else ''}: free some space, then run the same "
                "command again; finished work is kept and the interrupted stage resumes."
            )
        if kind == "read-only":
            return (
                f"the project is on a read-only file system{f' ({where})' if where else ''}: latentlab writes its "
                "data, runs and checkpoints in the project folder; run it from a folder you can write to."
            )
        error = error.__cause__ or error.__context__
    return None
