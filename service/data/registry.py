"""The data source kinds: one line each. Config validation (``data.kind``), the run's identity
(which ``data.*`` keys define its math), the dry run and the builder all read this table, so a
new source is its module plus one line here.

Pure data on purpose (no torch, no config import): ``service.config`` validates against it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SourceKind:
    name: str
    """The value of ``data.kind``."""
    builder: str
    """``module:function`` that builds the source: ``function(cfg: Config, size: int)``."""
    needs_url: bool = False
    """``data.url`` is required."""
    math_keys: tuple[str, ...] = ()
    """The ``data.*`` keys that decide which images this source yields (besides ``kind``):
    part of the run's identity, so a resume with other values is refused."""

    def build_function(self) -> Callable[..., Any]:
        module, _, function = self.builder.partition(":")
        return getattr(importlib.import_module(module), function)


SOURCES: dict[str, SourceKind] = {kind.name: kind for kind in (
    # large flat circles, squares and triangles in four colours (the quick demo)
    SourceKind("shapes", "service.data.generated:build_shapes", math_keys=("epoch_size",)),
    # the harder original shapes (smaller, five colours, varied grey backgrounds)
    SourceKind("synthetic", "service.data.generated:build_synthetic", math_keys=("epoch_size",)),
    # PNG/JPEG files under data.url; a class per first-level subfolder
    SourceKind("folder", "service.data.folder:build", needs_url=True, math_keys=("url", "resize")),
    # tar shards in the WebDataset layout with ftdiff's index.json (ftdiff data pack)
    SourceKind("webdataset", "service.data.webdataset:build", needs_url=True,
               math_keys=("url", "shuffle_window", "resize")),
    # scikit-learn's 8x8 handwritten digits
    SourceKind("digits", "service.data.digits:build"),
)}

# data.* keys that shape every source's stream (augmentation), whatever its kind.
COMMON_MATH_KEYS = ("hflip",)


def math_keys() -> tuple[str, ...]:
    """Every ``data.*`` key that defines a run's math, in a stable order."""
    keys = ["kind"]
    for kind in SOURCES.values():
        keys += [k for k in kind.math_keys if k not in keys]
    return (*keys, *COMMON_MATH_KEYS)


def math_keys_of(kind: str) -> tuple[str, ...]:
    """The ``data.*`` keys that define the math of a run of source kind ``kind`` (the others
    do nothing for it: a shapes run's data.resize or data.url may change freely)."""
    return ("kind", *SOURCES[kind].math_keys, *COMMON_MATH_KEYS)
