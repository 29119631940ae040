"""docs/config.md, generated from the config's pydantic models: every key with its type,
default, allowed values and description (the attribute docstrings in ``schema``).

    python -m service.config.reference > docs/config.md

tests/unit/test_config_reference.py fails when the committed file and this rendering differ.
"""

from __future__ import annotations

import json
import re
import types
import typing
from typing import Any

from pydantic.fields import FieldInfo

from service.config.schema import Config
from service.data.registry import SOURCES
from service.models.registry import FAMILIES

# Keys whose allowed values live in a registry rather than in a type.
_REGISTERED: dict[str, str] = {
    "model.family": ", ".join(f"`{name}`" for name in FAMILIES),
    "model.preset": "; ".join(f"{name}: " + ", ".join(f"`{p}`" for p in family.presets)
                              for name, family in FAMILIES.items()),
    "data.kind": ", ".join(f"`{name}`" for name in SOURCES),
}
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "string" if all(isinstance(a, str) for a in typing.get_args(annotation)) else "value"
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(_type(a) for a in args) + (" (optional)" if len(args) < len(typing.get_args(annotation)) else "")
    if origin is list:
        return "list of " + _type(typing.get_args(annotation)[0]) if typing.get_args(annotation) else "list"
    if origin is dict:
        return "table"
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(annotation, str(annotation))


def _allowed(key: str, field: FieldInfo) -> str:
    if key in _REGISTERED:
        return _REGISTERED[key]
    literal = next((a for a in [field.annotation, *typing.get_args(field.annotation)]
                    if typing.get_origin(a) is typing.Literal), None)
    if literal is not None:
        return ", ".join(f"`{json.dumps(v)}`" for v in typing.get_args(literal))
    bounds = [f"{_BOUNDS[name]} {getattr(m, name)}" for m in field.metadata for name in _BOUNDS
              if getattr(m, name, None) is not None]
    return ", ".join(bounds)


def _cell(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().replace("|", "\\|")


def render() -> str:
    defaults = Config().to_dict()
    lines = [
        "# Configuration reference",
        "",
        "Every key of the job's TOML config (`ftdiff train --config FILE`, or `--set section.key=value`),",
        "generated from `service/config/schema.py` by `python -m service.config.reference > docs/config.md`",
        "(a test keeps the two in sync). Keys are strict: a wrong type or an unknown key is exit 2 naming it.",
        "`--set section.key=null` puts a key back to its default (a file's value included).",
    ]
    for section, section_field in Config.model_fields.items():
        model = section_field.annotation
        assert isinstance(model, type)
        lines += ["", f"## [{section}]", ""]
        doc = (model.__doc__ or "").strip()
        if doc and not doc.startswith(model.__name__ + "("):  # pydantic's generated signature
            lines += [_cell(doc), ""]
        lines += ["| key | type | default | allowed | description |", "| --- | --- | --- | --- | --- |"]
        for name, field in model.model_fields.items():
            key = field.alias or name
            default = defaults[section][key]
            lines.append(f"| `{section}.{key}` | {_type(field.annotation)} | `{json.dumps(default)}` | "
                         f"{_cell(_allowed(f'{section}.{key}', field))} | {_cell(field.description or '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
