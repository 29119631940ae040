"""The manifest: what makes a checkpoint folder *committed*, and the ``latest`` pointer.

Commit protocol, in this order: (i) every rank's shards, (ii) DCP's ``.metadata``, (iii)
``manifest.json`` listing every file with its size and CRC-32C (computed while writing), (iv) the
``latest`` pointer. A folder without a valid manifest is not a checkpoint, whatever else it holds.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

MANIFEST = "manifest.json"
POINTER = "latest"
FORMAT = "ftdiff-checkpoint/1"
# Manifest: every file's size and CRC-32C (hex); see dcp_io.
STEP_DIR_RE = re.compile(r"^step-(\d{9,})$")


def step_dir(step: int) -> str:
    return f"step-{step:09d}"


def parse_step_dir(name: str) -> int | None:
    m = STEP_DIR_RE.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class FileEntry:
    size: int
    crc32c: str


class ManifestError(ValueError):
    """The manifest is missing, unparsable or inconsistent with its folder."""


@dataclass
class Manifest:
    step: int
    world_size: int
    config_hash: str
    files: dict[str, FileEntry]
    versions: dict[str, str] = field(default_factory=dict)
    samples_seen: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    """The run's full config, so export/sample can rebuild the model without the TOML."""
    time: float = field(default_factory=time.time)
    format: str = FORMAT

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> bytes:
        body = asdict(self)
        return json.dumps(body, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        try:
            body: dict[str, Any] = json.loads(data)
            if body.get("format") != FORMAT:
                raise ManifestError(f"unknown manifest format {body.get('format')!r}")
            files = {k: FileEntry(int(v["size"]), str(v["crc32c"])) for k, v in body["files"].items()}
            if ".metadata" not in files:
                raise ManifestError("manifest lists no .metadata")
            return cls(
                step=int(body["step"]),
                world_size=int(body["world_size"]),
                config_hash=str(body["config_hash"]),
                files=files,
                versions=dict(body.get("versions", {})),
                samples_seen=int(body.get("samples_seen", 0)),
                config=dict(body.get("config", {})),
                time=float(body["time"]),
            )
        except ManifestError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ManifestError(f"manifest is not valid: {type(e).__name__}: {e}") from None


def pointer_json(step: int) -> bytes:
    return json.dumps({"step": step, "path": step_dir(step)}).encode()


def parse_pointer(data: bytes) -> int | None:
    """The step a ``latest`` pointer names, or None if it is garbage."""
    try:
        body = json.loads(data)
        step = int(body["step"])
        return step if body.get("path") == step_dir(step) and step >= 0 else None
    except (ValueError, KeyError, TypeError):
        return None
