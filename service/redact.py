"""Secrets out of everything the service writes or prints: config dicts, URLs, messages.

Manifests, exports, logs, metrics and error messages pass through here (invariant 7: tokens
and credentials are never written to storage, exports, logs, metrics or command lines).
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"
# Settings whose whole value is a secret (everything URL-valued is redacted by redact_url).
SECRET_KEYS: frozenset[tuple[str, str]] = frozenset({("supervisor", "token")})
# Query parameters that carry credentials in presigned / SAS / token URLs.
_SECRET_QUERY = re.compile(r"sig|token|secret|pass|pwd|credential|key|auth", re.IGNORECASE)


def redact_config_dict(body: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config dict (``to_dict`` shape, or an older manifest's) without secrets.

    Works on any shape, so a checkpoint written before redaction existed — or with keys this
    version no longer knows — can still be redacted on its way out (export, ``ckpt show``).
    """
    out: dict[str, Any] = {}
    for section, values in body.items():
        if not isinstance(values, dict):
            out[section] = redact_url(values) if isinstance(values, str) else values
            continue
        clean: dict[str, Any] = {}
        for key, value in values.items():
            if (section, key) in SECRET_KEYS and value is not None:
                clean[key] = REDACTED
            elif isinstance(value, str):
                clean[key] = redact_url(value)
            else:
                clean[key] = value
        out[section] = clean
    return out


def redact_url(url: str) -> str:
    """``url`` without credentials: ``scheme://***@host/...``, secret query values ``***``.

    Any scheme (``s3://key:secret@bucket/p``, ``https://u:p@host``, fsspec chains such as
    ``simplecache::s3://...``). A password may hold ``@`` or an unescaped ``/`` (AWS secret
    keys do): the userinfo runs to the last ``@`` of the authority, or — when what precedes
    the first ``/`` looks like ``user:secret`` rather than ``host:port`` — to the last ``@``
    before the query. Erring towards masking too much: a message may lose a path segment,
    never leak a key.
    """
    if "://" not in url:
        return url
    return "::".join(_redact_one(part) for part in url.split("::"))


def _redact_one(url: str) -> str:
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    at = _userinfo_end(rest)
    prefix = ""
    if at >= 0:
        prefix, rest = f"{REDACTED}@", rest[at + 1:]
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    return f"{scheme}://{prefix}{rest[:cut]}{_redact_query(rest[cut:])}"


def _userinfo_end(rest: str) -> int:
    """Index of the ``@`` that ends the userinfo of ``rest`` (the URL after ``scheme://``), or -1.

    The authority runs to the first ``/``; a password may hold ``@``, ``?``, ``#`` or an
    unescaped ``/``. With an ``@`` in the authority, the userinfo ends at its last one; when
    the authority is cut short but looks like ``user:secret``, at the last ``@`` anywhere.
    """
    authority = rest.split("/", 1)[0]
    if "@" in authority:
        return authority.rfind("@")
    if _looks_like_userinfo(authority.split("?", 1)[0].split("#", 1)[0]) and "@" in rest:
        return rest.rfind("@")
    return -1


# A URL inside free text (a message, a traceback): scheme://, then up to whitespace or a quote.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")


def redact_text(text: str) -> str:
    """Every URL in ``text`` redacted (``redact_url``): for messages built from exceptions."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def _looks_like_userinfo(authority: str) -> bool:
    """``user:secret`` (cut short by a ``/`` in the secret), as opposed to ``host:port``."""
    if ":" not in authority or authority.startswith("["):
        return False
    return not authority.rsplit(":", 1)[1].isdigit()


def _redact_query(tail: str) -> str:
    if not tail.startswith("?"):
        return tail
    query, hash_, fragment = tail[1:].partition("#")
    parts = []
    for item in query.split("&"):
        name, eq, value = item.partition("=")
        parts.append(f"{name}={REDACTED}" if eq and value and _SECRET_QUERY.search(name) else item)
    return "?" + "&".join(parts) + hash_ + fragment
