"""Rank-aware logging: rank 0 speaks at INFO, other ranks only warn; text or JSON lines."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

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


def setup_logging(rank: int | str = 0, fmt: str = "text", verbose: bool = False) -> None:
    """``rank``: the worker's rank, or a role name ("supervisor") for non-worker processes."""
    level = logging.DEBUG if verbose else (logging.INFO if rank in (0, "supervisor") else logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter(rank))
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s [%(rank)s] %(levelname)s %(name)s: %(message)s")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries are chatty at INFO; keep their warnings only.
    for noisy in ("botocore", "s3fs", "aiobotocore", "fsspec", "urllib3", "diffusers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
