"""The launch environment: what the launcher hands a worker process besides its config.

Every ``FTDIFF_*`` variable the launcher sets for its workers is named here, with the one
function that writes it and the one that reads it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from service.errors import UserError

# Worker overrides travel in the environment, not on the command line: /proc/<pid>/cmdline is
# readable by every user of the machine, /proc/<pid>/environ only by the process's owner.
OVERRIDES_ENV = "FTDIFF_OVERRIDES"


def overrides_to_env(items: list[str]) -> str:
    """The value of FTDIFF_OVERRIDES for these ``section.key=value`` items (a JSON list)."""
    return json.dumps(list(items))


def overrides_from_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """The ``section.key=value`` items in FTDIFF_OVERRIDES ([] if unset or empty).

    Errors name the variable and the item's position (and its key), never a value: the
    variable exists to carry secrets.
    """
    raw = (os.environ if environ is None else environ).get(OVERRIDES_ENV)
    if raw is None or not raw.strip():
        return []
    expected = 'expected a JSON list of "section.key=value" strings, e.g. ["train.max_steps=30"]'
    try:
        items = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"{OVERRIDES_ENV} is not valid JSON ({e.msg} at character {e.pos}); {expected}") from None
    if not isinstance(items, list):
        raise UserError(f"{OVERRIDES_ENV} holds a JSON {type(items).__name__}; {expected}")
    for n, item in enumerate(items):
        if not isinstance(item, str):
            raise UserError(f"{OVERRIDES_ENV} item {n} is a JSON {type(item).__name__}, not a string; {expected}")
        key = item.split("=", 1)[0].strip()
        parts = key.split(".")
        if "=" not in item or len(parts) != 2 or not all(parts):
            raise UserError(f"{OVERRIDES_ENV} item {n}: not section.key=value; {expected}")
    return items
