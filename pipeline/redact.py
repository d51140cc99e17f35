"""Keep secrets out of what the pipeline prints and logs.

Credentials reach the pipeline inside URIs: ``http://user:password@mlflow:5000``, a presigned
``https://bucket.s3.../model.pt?X-Amz-Signature=...``, ``postgresql://user:pw@db/mlflow``. Everything
the CLI prints, every MLflow param and tag, and every warning that may quote a URI goes through
:func:`redact` first, which masks the password of a URI's user info and the values of query
parameters whose names say they are secret. User names, hosts, ports and paths stay readable.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
# Query parameters (and key=value pairs in free text) whose values are credentials.
_SECRET_NAME = (r"(?:[\w.-]*(?:password|passwd|secret|token|signature|credential|api[_-]?key|access[_-]?key)[\w.-]*"
                r"|sig|pwd)")
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s:/@]*):(?P<password>[^\s/@]*)@")
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
    return {k: (MASK if secret_key.match(str(k).rsplit(".", 1)[-1]) and v not in (None, "") else redact(v))
            for k, v in values.items()}
