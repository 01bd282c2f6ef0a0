"""Credentials never leave the process: every URL a message, tag, parameter or log line carries
passes ``redact`` first."""

from __future__ import annotations

import re
from typing import Any

RESULT_NEUTRAL = True  # what messages show, never what a run computes

# user:password@ (the password may hold "/" and "@": up to the last "@"), or a bare token@
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?:[^/:@\s]+:\S*|[^/@\s]+)@", re.IGNORECASE)


def redact(value: Any) -> Any:
    """Drop credentials embedded in URLs (``s3://key:secret@host``) before anything is logged."""
    return _URL_CREDENTIALS.sub(r"\g<scheme>***@", value) if isinstance(value, str) else value


def holds_credentials(value: str) -> bool:
    """Whether ``value`` embeds a URL's user or password."""
    return redact(value) != value
