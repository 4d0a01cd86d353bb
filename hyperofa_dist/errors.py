"""The one exception type the CLI turns into a one-line message and a non-zero exit, and the one redaction of
secrets (credentials in URIs) applied to every message and to every copy of the config the system writes."""

from __future__ import annotations

import re
import sys
from typing import Any, Callable

REDACTED = "***"
# `scheme://user:password@host` (and `scheme://token@host`): the user-info part of any URI.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s@'\"]+@")
# `?token=...`, `&password=...`: query parameters that carry a secret.
_SECRET_QUERY = re.compile(
    r"(?i)([?&](?:token|access_token|password|passwd|pwd|secret|api_key|apikey|key|sig|signature)=)[^&#\s'\"]+"
)


def redact(value: Any) -> Any:
    """`value` with the credentials of every URI it holds replaced by `***` (strings, and strings inside dicts,
    lists and tuples; other values unchanged): what manifests, job files, MLflow params, logs and errors get."""
    if isinstance(value, str):
        return _SECRET_QUERY.sub(r"\1" + REDACTED, _USERINFO.sub(r"\1" + REDACTED + "@", value))
    if isinstance(value, dict):
        return {key: redact(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(item) for item in value]
    return value


def is_redacted(uri: str) -> bool:
    """A URI whose credentials `redact` replaced (read back from a job file or manifest)."""
    return redact(uri) == uri and (f"://{REDACTED}@" in uri or f"={REDACTED}" in uri)


class HyperofaError(Exception):
    """A user-facing failure: bad input, bad config, a missing file.

    The message must be one line that names the file or key and the problem; the CLI prints it
    without a traceback. Anything else that escapes is a bug and keeps its traceback. Credentials in a URI it
    echoes are redacted.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(redact(str(message))).split()))


def exit_status(program: str, action: Callable[[], Any]) -> int:
    """What a command-line entry point returns: 0 when `action()` returns, 2 with the one line
    `<program>: error: <message>` on stderr when it raises `HyperofaError` (anything else keeps its traceback)."""
    try:
        action()
    except HyperofaError as exc:
        print(f"{program}: error: {exc}", file=sys.stderr)
        return 2
    return 0
