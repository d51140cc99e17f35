"""Keep secrets out of what the pipeline prints and logs.

Credentials reach the pipeline inside URIs: ``http://user:password@mlflow:5000``, a presigned
``https://bucket.s3.../model.pt?X-Amz-Signature=...``, ``postgresql://user:pw@db/mlflow``. Everything
the CLI prints, every MLflow param and tag, and every warning that may quote a URI goes through
:func:`redact` first, which masks the password of a URI's user info and the values of query
parameters whose names say they are secret. User names, hosts, ports and paths stay readable.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

MASK = "***"
# Query parameters (and key=value pairs in free text) whose values are credentials.
_SECRET_NAME = (
    r"(?:[\w.-]*(?:password|passwd|secret|token|signature|credential|api[_-]?key|access[_-]?key)[\w.-]*"
    r"|sig|pwd)"
)
# The user info runs to the LAST "@" of the authority (which ends at "/", "?", "#", a quote or white space):
# a password holding a raw "@" ("p@ss") is masked whole, not cut at its first "@".
_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s:/?#@'\"<>]*(?:@[^\s:/?#@'\"<>]*)*)"
    r":(?P<password>[^\s/?#'\"<>]*)@"
)
_QUERY = re.compile(rf"(?P<name>[?&;]{_SECRET_NAME}=)(?P<value>[^&;#\s'\"]*)", re.IGNORECASE)
_ENV_STYLE = re.compile(rf"(?P<name>\b{_SECRET_NAME}\s*[=:]\s*)(?P<value>[^\s,;'\"&]+)", re.IGNORECASE)


def redact(text: Any) -> Any:
    """``text`` with URI passwords and secret-looking parameter values replaced by ``***``.

    Non-strings are returned unchanged, so it can be mapped over param values of any type.
    """
    if not isinstance(text, str):
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    text = _QUERY.sub(lambda m: f"{m['name']}{MASK}", text)
    return _ENV_STYLE.sub(lambda m: f"{m['name']}{MASK}", text)


def redact_mapping(values: dict) -> dict:
    """A copy of ``values`` (MLflow params or tags) with every value redacted; a value whose *key*
    names a secret (``*password*``, ``*token*``...) is masked whole."""
    secret_key = re.compile(rf"^{_SECRET_NAME}$", re.IGNORECASE)
    return {
        k: (MASK if secret_key.match(str(k).rsplit(".", 1)[-1]) and v not in (None, "") else redact(v))
        for k, v in values.items()
    }


# ---------------------------------------------------------------- every log line and print of a process


class RedactingFilter(logging.Filter):
    """A logging filter that applies :func:`redact` to a record's message (arguments merged in) and to
    its formatted traceback; it never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102 -- logging API
        _redact_record(record)
        return True


def _redact_record(record: logging.LogRecord) -> logging.LogRecord:
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 -- a malformed record is logging's to report, not ours
        return record
    masked = redact(message)
    if masked != message:
        record.msg, record.args = masked, ()
    if record.exc_info and not record.exc_text:
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
    return record


class RedactingStream:
    """A text stream that applies :func:`redact` to every ``write`` (MLflow prints its "View run at
    <tracking URI>" line with ``sys.stdout.write``, outside logging); everything else is delegated."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):  # noqa: D102 -- io API
        return self._stream.write(redact(text) if isinstance(text, str) else text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


_previous_factory = None


def install() -> None:
    """Mask URI secrets in everything this process logs or prints: a log-record factory (every logger,
    every handler, created now or later -- MLflow's and Ray's loggers have handlers of their own), a
    :class:`RedactingFilter` on the root logger and its handlers, and redacting ``sys.stdout`` /
    ``sys.stderr``. Idempotent. Called by the CLI and, as Ray's ``worker_process_setup_hook``, in every
    Ray worker process (Ray Train workers, Tune trials, evaluation tasks)."""
    global _previous_factory
    if _previous_factory is None:
        _previous_factory = logging.getLogRecordFactory()
        logging.setLogRecordFactory(lambda *args, **kwargs: _redact_record(_previous_factory(*args, **kwargs)))
    root = logging.getLogger()
    for target in [root, *root.handlers]:
        if not any(isinstance(f, RedactingFilter) for f in target.filters):
            target.addFilter(RedactingFilter())
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))
