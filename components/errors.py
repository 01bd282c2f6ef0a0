"""The exceptions the CLI shows as a short message instead of a traceback."""

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
