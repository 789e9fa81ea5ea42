"""Secrets out of what the pipeline writes: MLflow params, logged commands, alert records, summaries.

Three kinds are recognised: a value under a secret-looking name (``HF_TOKEN``, ``db.password``,
``Authorization``), credentials inside a URL (``https://user:pass@host``) and a bearer token
in text. Masked values are replaced, not dropped, so a reader still sees that something was there.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

REDACTED = "***redacted***"
_SECRET_KEY = re.compile(r"(token|secret|password|passwd|api[_-]?key|credential|authorization|private[_-]?key)",
                         re.IGNORECASE)
# scheme://user[:password]@  (userinfo may hold any character but '/', '@' and whitespace)
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_BEARER = re.compile(r"(?P<word>\bbearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    """A name under which a secret is likely stored (environment variable, param, header)."""
    return bool(_SECRET_KEY.search(key))


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with URL credentials, bearer tokens and the given literal ``secrets`` masked."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    return _BEARER.sub(lambda m: f"{m.group('word')}{REDACTED}", text)


def strip_credentials(uri: str) -> str:
    """``uri`` without the user and password of its network location (other URIs unchanged)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
