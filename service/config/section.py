"""The base of every config section: strict types, no unknown keys, docstrings as documentation."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # strict: "3" is not an int, "yes" is not a bool; extra keys are typos.
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True, frozen=True,
                              use_attribute_docstrings=True)  # the docstrings: docs/config.md
