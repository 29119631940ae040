"""docs/config.md is the rendering of the config's models: every key documented, in sync."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import Config
from service.config.reference import render

pytestmark = pytest.mark.timeout(30)
DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_the_committed_reference_is_the_rendering_of_the_schema():
    assert DOC.read_text() == render(), "run: python -m service.config.reference > docs/config.md"


def test_every_key_is_in_the_reference_with_a_description():
    text = render()
    for section, section_field in Config.model_fields.items():
        for name, field in section_field.annotation.model_fields.items():  # type: ignore[union-attr]
            key = f"{section}.{field.alias or name}"
            assert f"| `{key}` |" in text, key
            assert field.description, f"{key} has no docstring in service/config/schema.py"
