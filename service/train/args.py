"""The worker's command-line flags (``python -m service.train``, ``ftdiff train|supervise|worker``).

Kept apart from ``service.train.entry`` and free of torch: ``ftdiff --version``, ``ftdiff env``
and every other command build their parser from this, and must work where torch cannot be
imported (``ftdiff env`` is the command that reports such a broken install).
"""

from __future__ import annotations

import argparse

from service.launch_env import OVERRIDES_ENV


def override_item(item: str) -> str:
    """``--set``'s type: a ``section.key=value`` item, refused at parse time (exit 2, naming
    --set) when it cannot be one. Messages name the key, never the value (it may be a secret)."""
    key, eq, _ = item.partition("=")
    parts = key.strip().split(".")
    if not eq or len(parts) != 2 or not all(p.strip() for p in parts):
        shown = f"{key.strip()!r}" if eq else "an item without '='"
        raise argparse.ArgumentTypeError(
            f"{shown}: expected section.key=value, e.g. train.max_steps=30")
    try:
        item.encode("utf-8")
    except UnicodeEncodeError:
        # Bytes that are not UTF-8 reach Python as lone surrogates; a TOML config (and the
        # JSON in $FTDIFF_OVERRIDES) can only hold Unicode text, so no config can carry them.
        raise argparse.ArgumentTypeError(
            f"{key.strip()!r}=...: the value is not valid UTF-8 (a config can only hold Unicode "
            "text; rename the path or set LANG/LC_ALL to a UTF-8 locale)") from None
    return item


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file or preset name (tiny, small, base); default: embedded tiny")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", type=override_item,
                   help=f"override one config key (repeatable; after those in ${OVERRIDES_ENV})")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="log lines as text or JSON (one object per line)")
    p.add_argument("--verbose", action="store_true",
                   help="more detail: debug logs (workers, supervisor) and the traceback of a failure")
