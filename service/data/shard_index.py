"""The index of a sharded data set (``data.kind = "webdataset"``): ``index.json`` beside the
tar shards, written last by ``ftdiff data pack`` / ``ftdiff data index`` (so a half-written
data set has none), read by every rank instead of listing the prefix or opening the shards.

It holds each shard's name, sample count, size and sha256, the class names and each shard's
label histogram. Its digest is part of the run's identity: a data set that changed (a shard
added, replaced or re-packed) is another run, never silently mixed into this one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from service.errors import UserError

INDEX_NAME = "index.json"
FORMAT = "ftdiff-webdataset/1"


@dataclass(frozen=True)
class ShardEntry:
    name: str
    """The tar's path relative to the data set's root."""
    samples: int
    bytes: int
    sha256: str
    labels: dict[str, int] = field(default_factory=dict)
    """Class id (as a string: JSON keys) -> samples of it in this shard."""
    captioned: int = 0


@dataclass(frozen=True)
class ShardIndex:
    shards: tuple[ShardEntry, ...]
    classes: tuple[str, ...] = ()
    """Class names, in id order (empty: the data has no labels)."""

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def num_captioned(self) -> int:
        return sum(s.captioned for s in self.shards)

    @property
    def num_labelled(self) -> int:
        return sum(sum(s.labels.values()) for s in self.shards)

    def to_json(self) -> str:
        body = {"format": FORMAT, "classes": list(self.classes), "shards": [asdict(s) for s in self.shards]}
        return json.dumps(body, indent=1, sort_keys=True) + "\n"

    def digest(self) -> str:
        """sha256 of the canonical JSON (16 hex digits): what the run's identity records."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, text: str, where: str) -> ShardIndex:
        try:
            body: dict[str, Any] = json.loads(text)
            if body.get("format") != FORMAT:
                raise ValueError(f"format {body.get('format')!r}, not {FORMAT!r}")
            shards = tuple(ShardEntry(name=str(s["name"]), samples=int(s["samples"]), bytes=int(s["bytes"]),
                                      sha256=str(s["sha256"]),
                                      labels={str(k): int(v) for k, v in s.get("labels", {}).items()},
                                      captioned=int(s.get("captioned", 0)))
                           for s in body["shards"])
            classes = tuple(str(c) for c in body.get("classes", []))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{where} is not a data set index ({type(e).__name__}: {e}); rebuild it with "
                            "`ftdiff data index URL`") from None
        if not shards or any(s.samples < 1 for s in shards):
            raise UserError(f"{where} lists no shards (or an empty one); pack the data again with `ftdiff data pack`")
        if len({s.name for s in shards}) != len(shards):
            raise UserError(f"{where} lists a shard twice; rebuild it with `ftdiff data index URL`")
        for s in shards:
            problem = _problem(s, len(classes))
            if problem:
                raise UserError(f"{where}: shard {s.name!r} {problem}; rebuild the index with `ftdiff data index URL`")
        return cls(shards=shards, classes=classes)


def _problem(shard: ShardEntry, classes: int) -> str | None:
    """What makes an index entry impossible (None: nothing)."""
    parts = shard.name.split("/")
    if shard.name.startswith("/") or any(part in ("", ".", "..") for part in parts):
        return "is not a path inside the data set"
    if any(not key.isdigit() or (classes and int(key) >= classes) for key in shard.labels):
        return f"has labels outside 0..{classes - 1 if classes else 'N'} ({', '.join(sorted(shard.labels)[:3])})"
    if sum(shard.labels.values()) > shard.samples or shard.captioned > shard.samples or min(
            [*shard.labels.values(), 0]) < 0:
        return "counts more labels or captions than samples"
    return None
