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

from service.checkpoint.errors import ManifestError
from service.config import redact_config_dict

MANIFEST = "manifest.json"
POINTER = "latest"
FORMAT = "ftdiff-checkpoint/1"
# Manifest: every file's size and CRC-32C (hex); see dcp_io.
STEP_DIR_RE = re.compile(r"^step-(\d+)$")
# The only file names DCP and ftdiff write into a step folder: DCP's metadata (global, and
# per rank in newer releases) and shards "__<rank>_<n>.distcp", optionally with the writer's
# tag between rank and number ("__0_i3_0.distcp"). Anything else in a manifest is refused.
FILE_NAME_RE = re.compile(r"^(\.metadata|__\d+\.metadata|__\d+_[A-Za-z0-9_]*\.distcp)$")
CRC32C_RE = re.compile(r"^[0-9a-f]{8}$")


def step_dir(step: int) -> str:
    """The folder name ftdiff writes: ``step-`` and the step zero-padded to 9 digits."""
    return f"step-{step:09d}"


def parse_step_dir(name: str, canonical: bool = True) -> int | None:
    """The step of a folder name ``step-N``, or None.

    ``canonical`` (listings): only the name ``step_dir`` writes, so a hand-made ``step-150``
    beside ``step-000000150`` never passes for a checkpoint folder (its path would not be
    the one ftdiff reads). ``canonical=False`` (URLs users type): any number of digits.
    """
    m = STEP_DIR_RE.match(name)
    if not m:
        return None
    step = int(m.group(1))
    return step if not canonical or name == step_dir(step) else None


@dataclass(frozen=True)
class FileEntry:
    size: int
    crc32c: str




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
    run_id: str | None = None
    """The run that wrote it (FTDIFF_RUN_ID / torchrun's --rdzv-id), if known."""
    incarnation: int | None = None
    """The start of the job that wrote it (see service.checkpoint.ownership)."""
    fingerprint: dict[str, Any] = field(default_factory=dict)
    """The settings that define the run's math (see service.checkpoint.identity)."""
    suspect_since: int | None = None
    """Taken while a loss spike that began at this step was being judged: never a rollback target."""
    skips: list[list[int]] = field(default_factory=list)
    """The windows of the sample stream this run skips (service.data.skips), for people to read."""
    lineage: dict[str, Any] | None = None
    """A fork's parent: {"parent": checkpoint URL, "parent_root", "parent_run": run id, "step",
    "changed": [lines]}."""

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> bytes:
        body = asdict(self)
        # Redacted here too, whatever the caller passed: a manifest is readable by everyone
        # who can list the bucket, and outlives the credentials it would otherwise leak.
        body["config"] = redact_config_dict(body["config"])
        return json.dumps(body, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        """Parse and check a manifest. Its bytes are untrusted (anyone who can write the
        bucket can write them): every file entry must be a name DCP writes, with a size and a
        CRC-32C of the right form, before any caller builds a path or a read from it."""
        try:
            body: dict[str, Any] = json.loads(data)
            if not isinstance(body, dict):
                raise ManifestError("manifest is not a JSON object")
            if body.get("format") != FORMAT:
                raise ManifestError(f"unknown manifest format {_show(body.get('format'))}")
            files = _files(body["files"])
            incarnation = body.get("incarnation")
            fingerprint = body.get("fingerprint") or {}
            if not isinstance(fingerprint, dict):
                raise ManifestError("manifest fingerprint is not an object")
            return cls(
                step=_count(body, "step"),
                world_size=_count(body, "world_size", minimum=1),
                config_hash=str(body["config_hash"]),
                files=files,
                versions={str(k): str(v) for k, v in dict(body.get("versions", {})).items()},
                samples_seen=_count(body, "samples_seen", default=0),
                config=dict(body.get("config", {})),
                time=float(body["time"]),
                run_id=None if body.get("run_id") is None else str(body["run_id"]),
                incarnation=None if incarnation is None else _count(body, "incarnation"),
                fingerprint=dict(fingerprint),
                suspect_since=None if body.get("suspect_since") is None else _count(body, "suspect_since"),
                skips=_windows(body.get("skips", [])),
                lineage=_lineage(body.get("lineage")),
            )
        except ManifestError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ManifestError(f"manifest is not valid: {type(e).__name__}: {e}") from None


def _files(raw: Any) -> dict[str, FileEntry]:
    """The ``files`` table, every entry checked; ManifestError naming the first bad one."""
    if not isinstance(raw, dict):
        raise ManifestError("manifest files is not an object")
    files: dict[str, FileEntry] = {}
    for name, entry in raw.items():
        where = f"manifest entry {_show(name)}"
        if not FILE_NAME_RE.match(name):
            raise ManifestError(f"{where}: not a file name DCP writes (.metadata, __<rank>_<n>.distcp)")
        if not isinstance(entry, dict):
            raise ManifestError(f"{where}: not an object with size and crc32c")
        size, crc = entry.get("size"), entry.get("crc32c")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"{where}: size {_show(size)} is not a byte count (an integer >= 0)")
        if not isinstance(crc, str) or not CRC32C_RE.match(crc):
            raise ManifestError(f"{where}: crc32c {_show(crc)} is not 8 lowercase hex digits")
        files[name] = FileEntry(size, crc)
    if ".metadata" not in files:
        raise ManifestError("manifest lists no .metadata")
    return files


def _lineage(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    ok = (isinstance(raw, dict) and isinstance(raw.get("parent"), str) and isinstance(raw.get("step"), int)
          and isinstance(raw.get("changed", []), list) and all(isinstance(c, str) for c in raw.get("changed", [])))
    if not ok:
        raise ManifestError(f"manifest lineage {_show(raw)} is not a parent URL, a step and a list of changes")
    return {"parent": raw["parent"], "parent_root": str(raw.get("parent_root") or ""),
            "parent_run": str(raw.get("parent_run") or ""), "step": raw["step"], "changed": list(raw.get("changed", []))}


def _windows(raw: Any) -> list[list[int]]:
    ok = isinstance(raw, list) and all(
        isinstance(w, list) and len(w) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in w)
        and 0 <= w[0] < w[1] for w in raw)
    if not ok:
        raise ManifestError(f"manifest skips {_show(raw)} is not a list of [start, end] ranges")
    return [list(w) for w in raw]


def _count(body: dict[str, Any], key: str, minimum: int = 0, default: int | None = None) -> int:
    value = body[key] if default is None else body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ManifestError(f"manifest {key} {_show(value)} is not an integer >= {minimum}")
    return value


def _show(value: Any) -> str:
    """An untrusted value for a message: repr, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def pointer_json(step: int) -> bytes:
    return json.dumps({"step": step, "path": step_dir(step)}).encode()


def parse_pointer(data: bytes) -> int | None:
    """The step a ``latest`` pointer names, or None if it is garbage."""
    try:
        body = json.loads(data)
        step = int(body["step"])
        return step if body.get("path") == step_dir(step) and step >= 0 else None
    except (ValueError, KeyError, TypeError, OverflowError):  # OverflowError: {"step": 1e999}
        return None
