"""A small TOML writer for the config's shape: ``[section]`` tables of scalar keys.

tomllib only reads, and no TOML writer is a dependency; the config is flat (sections of
strings, numbers, booleans and unset values), so a few lines cover it exactly. What this writes
reads back with tomllib to the same values (``tests/unit/test_cli_polish.py`` checks that).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from service.errors import UserError

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def dumps(body: Mapping[str, Any], header: str = "") -> str:
    """``body`` ({section: {key: value}}) as TOML. TOML has no null: an unset key becomes a
    comment (``# key: unset ...``), so the output still shows that the key exists."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    top = {k: v for k, v in body.items() if not isinstance(v, Mapping)}
    for key, value in top.items():
        lines.append(_pair(key, value))
    for section, values in body.items():
        if not isinstance(values, Mapping):
            continue
        if lines:
            lines.append("")
        lines.append(f"[{_key(section)}]")
        lines += [_pair(key, value, f"{section}.{key}") for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _pair(key: str, value: Any, name: str = "") -> str:
    if value is None:
        return f"# {_key(key)}: unset (its default applies)"
    text = f"{_key(key)} = {_value(value)}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Bytes that are not UTF-8 (a path from the command line or the environment) reach
        # Python as lone surrogates; TOML strings are Unicode and cannot hold them.
        raise UserError(f"{name or key}: the value holds bytes that are not UTF-8, which TOML cannot hold "
                        "(from --set, $FTDIFF_OVERRIDES or the config file); use a UTF-8 name") from None
    return text


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _string(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)  # shortest round-trip form; TOML needs a '.' or an exponent
        return text if any(c in text for c in ".eE") else f"{text}.0"
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _string(text: str) -> str:
    # JSON's escapes are TOML basic-string escapes; DEL is the one control character JSON
    # leaves raw and TOML refuses.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")
