"""Rank-aware logging: rank 0 speaks at INFO, other ranks only warn; text or JSON lines."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from typing import Any

from service.config import REDACTED, redact_text

# Attributes every LogRecord has; anything else passed through `extra=` is a structured field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class _RankFilter(logging.Filter):
    def __init__(self, rank: int | str):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank if isinstance(self.rank, str) else f"rank {self.rank}"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for Kubernetes log pipelines."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "rank": getattr(record, "rank", "rank 0"),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key != "rank":
                body[key] = value
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with credentials in URLs and the given secret values masked."""
    text = redact_text(text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


class _ScrubbingFormatter(logging.Formatter):
    """Masks secrets in the *formatted* line — message, arguments, extra fields and any
    traceback alike — so no code path can log a token or a ``user:pass@`` URL by mistake."""

    def __init__(self, inner: logging.Formatter, secrets: Iterable[str]):
        super().__init__()
        self.inner = inner
        # Longest first: a secret that contains another must be masked whole.
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        return scrub(self.inner.format(record), self.secrets)


def setup_logging(rank: int | str = 0, fmt: str = "text", verbose: bool = False,
                  secrets: Iterable[str | None] = ()) -> None:
    """``rank``: the worker's rank, or a role name ("supervisor") for non-worker processes.

    ``secrets``: values (the supervisor token) that must never appear in a log line; URL
    credentials are masked whatever the caller passes.
    """
    level = logging.DEBUG if verbose else (logging.INFO if rank in (0, "supervisor") else logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter(rank))
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s [%(rank)s] %(levelname)s %(name)s: %(message)s")
        formatter.converter = time.gmtime
    handler.setFormatter(_ScrubbingFormatter(formatter, [s for s in secrets if s]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries are chatty at INFO; keep their warnings only.
    for noisy in ("botocore", "s3fs", "aiobotocore", "fsspec", "urllib3", "diffusers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def utc_text(when: float | None) -> str:
    """A Unix time as ``2025-05-01 12:00:03 UTC`` (UTC: the same on every machine and log)."""
    if not when:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))
