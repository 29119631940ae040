"""The node-local memory tier: files in shared memory that hold the state of a completed step.

When a worker dies, torchrun stops and restarts the whole group, and without this tier every
rank resumes from the last *committed* checkpoint, losing up to ``checkpoint.every_steps``
steps that the surviving ranks still held. Under DDP every rank holds the full model,
optimizer and EMA state, and the rest (train counters, data position) is global: at a given
step the state is the same on every rank. So the survivors leave it in shared memory on their
way out (``memory_recovery``), and the restarted ranks take it back from there.

One file per node and step is enough (the state at a step is identical on every rank; the
per-rank RNG is not kept, the math never depends on it), so ranks of one node never write the
same step twice and a node keeps at most ``KEEP`` files of a run. A file::

    MAGIC | payload: torch.save of {registry key: state dict} | header (JSON) | trailer

    trailer = header length (u32 LE) | CRC-32C of the header (u32 LE) | MAGIC

The header names the run id, the incarnation of the root that wrote it, the fingerprint of the
run's math, the step, the world size and the payload's offset, length and CRC-32C. A file is
written beside its final name and hard-linked into place (atomic, and never replaces a file a
peer already put there). Reading never executes code from it: the payload goes through
``torch.load(weights_only=True)``, and only after its CRC-32C matched.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import struct
import tempfile
import time
from dataclasses import asdict, dataclass, field
from hashlib import blake2b
from pathlib import Path
from typing import Any

import crc32c
import torch

from service.checkpoint.identity import differences
from service.node.proc import pid_alive

log = logging.getLogger(__name__)

MAGIC = b"FTDMEM01"
FORMAT = "ftdiff-memory/1"
TRAILER = struct.Struct("<II8s")
KEEP = 2  # files per run and node: the newest, and one to fall back on should it be bad
# A run that ended without finishing (gave up, killed with its agent) leaves its files behind;
# /dev/shm is RAM that only a reboot would give back, so files of any run of this user that are
# older than this go whenever a worker writes a snapshot or restarts.
MAX_AGE_S = 24 * 3600
MAX_HEADER = 1 << 20

# Why a file was not used (label ``reason`` of ftdiff_checkpoint_memory_snapshots_rejected_total).
CORRUPT, FOREIGN, STALE = "corrupt", "foreign", "stale"
REJECT_REASONS = (CORRUPT, FOREIGN, STALE)


class Rejected(Exception):
    """A snapshot that must not be used, and why (one of ``REJECT_REASONS``)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Header:
    run_id: str
    incarnation: int | None
    fingerprint: dict[str, Any]
    step: int
    world_size: int
    rank: int
    """The rank that wrote it (any rank's state at ``step`` is the same)."""
    payload_offset: int = len(MAGIC)
    payload_length: int = 0
    payload_crc32c: int = 0
    time: float = field(default_factory=time.time)
    format: str = FORMAT


@dataclass(frozen=True)
class Expected:
    """What this start accepts: its own run and math, and only state newer than the newest
    commit, written by the start that made that commit or a later one (an older start's state
    may belong to a history the run has since left). Any world size: the state kept is the
    same on every rank (model, optimizer, EMA, schedules, counters, the global data position)
    and independent of the world size, so a job that shrank or grew after losing or regaining a
    node continues from the survivors' step too (``world_size`` is kept for the log)."""

    run_id: str
    fingerprint: dict[str, Any]
    world_size: int
    committed_step: int | None
    committed_incarnation: int | None


def default_dir() -> Path:
    """``/dev/shm`` (RAM, gone with the node, survives the worker) if writable, else a tempdir;
    per user, so one user's files are never in another's way."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else Path(tempfile.gettempdir())
    return base / f"ftdiff-memory-{os.getuid()}"


def run_key(run_id: str) -> str:
    """A file-name-safe key for a run id (readable part plus a digest of the whole id)."""
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)[:40]
    return f"{readable}-{blake2b(run_id.encode(), digest_size=6).hexdigest()}"


class _ChecksummingFile:
    """Passes writes through to ``f`` and keeps the CRC-32C and size of what went by, so the
    payload is checksummed while ``torch.save`` streams it (no second pass, no extra copy)."""

    def __init__(self, f: io.BufferedWriter):
        self.f, self.crc, self.size = f, 0, 0

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.crc = crc32c.crc32c(view, self.crc)
        self.size += view.nbytes
        return self.f.write(view)

    def flush(self) -> None:
        self.f.flush()


def encode_file(path: Path, header: Header, state: dict[str, Any]) -> int:
    """Write ``state`` with ``header`` to a new file at ``path`` (which must not exist: O_EXCL,
    so a planted link is never followed); its size."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(MAGIC)
        body = _ChecksummingFile(f)
        torch.save(state, body)
        final = Header(**{**asdict(header), "payload_offset": len(MAGIC), "payload_length": body.size,
                          "payload_crc32c": body.crc})
        blob = json.dumps(asdict(final), sort_keys=True).encode()
        f.write(blob)
        f.write(TRAILER.pack(len(blob), crc32c.crc32c(blob), MAGIC))
        # No fsync: the tier lives in RAM (/dev/shm); a file only has to survive the process.
        return len(MAGIC) + body.size + len(blob) + TRAILER.size


def read_header(path: Path) -> Header:
    """The header of a snapshot file, checked for shape and checksum (not the payload)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < len(MAGIC) + TRAILER.size or f.read(len(MAGIC)) != MAGIC:
                raise Rejected(CORRUPT, "not a memory-tier snapshot (bad start)")
            f.seek(size - TRAILER.size)
            length, crc, end = TRAILER.unpack(f.read(TRAILER.size))
            if end != MAGIC or length > min(MAX_HEADER, size - len(MAGIC) - TRAILER.size):
                raise Rejected(CORRUPT, "torn or truncated (no trailer)")
            f.seek(size - TRAILER.size - length)
            blob = f.read(length)
    except OSError as e:
        raise Rejected(CORRUPT, f"unreadable: {e}") from None
    if crc32c.crc32c(blob) != crc:
        raise Rejected(CORRUPT, "header checksum mismatch")
    try:
        body = json.loads(blob)
        header = Header(**body)
        ints = (header.step, header.world_size, header.rank, header.payload_offset, header.payload_length,
                header.payload_crc32c)
        typed = (isinstance(header.run_id, str) and isinstance(header.fingerprint, dict)
                 and (header.incarnation is None or type(header.incarnation) is int)
                 and all(type(v) is int for v in ints))
        if header.format != FORMAT or not typed:
            raise ValueError(f"format {header.format!r}, or a field of the wrong type")
    except (ValueError, TypeError) as e:
        raise Rejected(CORRUPT, f"unreadable header: {e}") from None
    if header.payload_offset + header.payload_length != size - TRAILER.size - length:
        raise Rejected(CORRUPT, "payload length does not match the file (torn?)")
    return header


def check(header: Header, expected: Expected) -> None:
    """Raise ``Rejected`` unless this start may use the snapshot described by ``header``."""
    if header.run_id != expected.run_id:
        raise Rejected(FOREIGN, f"written by run {header.run_id!r}, this is {expected.run_id!r}")
    hard, _ = differences(header.fingerprint, expected.fingerprint)
    if hard or not header.fingerprint:
        raise Rejected(FOREIGN, "other settings that define the math: "
                       + ("; ".join(hard) or "none recorded"))
    if header.step <= (expected.committed_step if expected.committed_step is not None else 0):
        raise Rejected(STALE, f"step {header.step} is not newer than the newest commit "
                              f"(step {expected.committed_step})")
    if (header.incarnation or 0) < (expected.committed_incarnation or 0):
        raise Rejected(STALE, f"written by incarnation {header.incarnation}, older than incarnation "
                              f"{expected.committed_incarnation} that made the newest commit")


def read_payload(path: Path, header: Header) -> torch.Tensor:
    """The payload bytes (as a uint8 tensor, ready to broadcast), checked against the header."""
    data = torch.empty(header.payload_length, dtype=torch.uint8)
    try:
        with open(path, "rb") as f:
            f.seek(header.payload_offset)
            got = f.readinto(memoryview(data.numpy()))
    except OSError as e:
        raise Rejected(CORRUPT, f"unreadable: {e}") from None
    if got != header.payload_length:
        raise Rejected(CORRUPT, "truncated payload")
    check_payload(data, header)
    return data


def check_payload(data: torch.Tensor, header: Header) -> None:
    if crc32c.crc32c(memoryview(data.numpy())) != header.payload_crc32c:
        raise Rejected(CORRUPT, "payload checksum mismatch")


def decode_payload(data: torch.Tensor) -> dict[str, Any]:
    """The state dicts in a payload. ``weights_only``: tensors and plain containers/scalars
    only, so a crafted pickle is refused instead of run."""
    try:
        state = torch.load(io.BytesIO(memoryview(data.numpy())), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any failure: a bad file, never a reason to load laxer)
        raise Rejected(CORRUPT, f"payload does not decode safely: {type(e).__name__}: {str(e)[:200]}"
                       ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise Rejected(CORRUPT, "payload is not a state dict")
    return state


class MemoryTier:
    """One run's snapshot files in one directory (a node's shared memory)."""

    def __init__(self, run_id: str, directory: str | os.PathLike[str] | None = None):
        self.run_id = run_id
        self.dir = Path(directory) if directory else default_dir()
        self.prefix = f"ftdiff-{run_key(run_id)}-step-"

    def path(self, step: int) -> Path:
        return self.dir / f"{self.prefix}{step:09d}.mem"

    def steps(self) -> list[int]:
        """Steps of this run's files here, newest first."""
        found = []
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        for name in names:
            if name.startswith(self.prefix) and name.endswith(".mem"):
                stem = name[len(self.prefix):-len(".mem")]
                if stem.isdigit() and len(stem) == 9:
                    found.append(int(stem))
        return sorted(found, reverse=True)

    def write(self, header: Header, state: dict[str, Any]) -> Path | None:
        """Leave ``state`` (at ``header.step``) here; the file, or None if a peer on this node
        already left that step (the same state). Older files beyond ``KEEP`` are removed first,
        so the tier never holds more than ``KEEP`` files of the run, the one being written included."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.check_dir()
        final = self.path(header.step)
        if final.exists():
            if self._same_state(final, header):
                return None
            self._unlink(final)  # left by another start (other world size, older incarnation)
        for old in [s for s in self.steps() if s != header.step][KEEP - 1:]:
            self._unlink(self.path(old))
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        self._unlink(tmp)
        try:
            encode_file(tmp, header, state)
            os.link(tmp, final)  # atomic, and never replaces what a peer put there first
        except FileExistsError:
            return None
        finally:
            self._unlink(tmp)
        return final

    @staticmethod
    def _same_state(path: Path, header: Header) -> bool:
        """Whether the file at ``path`` holds what ``header`` describes: the same step of the
        same start at the same world size — the state a peer on this node already left."""
        try:
            there = read_header(path)
        except Rejected:
            return False
        return (there.run_id, there.incarnation, there.world_size, there.step, there.fingerprint) == (
            header.run_id, header.incarnation, header.world_size, header.step, header.fingerprint)

    def check_dir(self) -> None:
        """The directory must be this user's and writable by no one else: whoever can write
        it can remove or swap the files (shared /dev/shm is world-writable; the default
        directory in it is per user, 0700)."""
        st = os.stat(self.dir)
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise PermissionError(f"{self.dir} is not private to this user (owner uid {st.st_uid}, "
                                  f"mode {st.st_mode & 0o777:o}); the memory tier does not use it")

    def find(self, expected: Expected) -> tuple[tuple[Header, Path] | None, list[tuple[Path, Rejected]]]:
        """The newest file whose header ``expected`` accepts (its payload is not read yet),
        and the files passed over on the way, each with the reason."""
        rejected: list[tuple[Path, Rejected]] = []
        if not self.dir.exists():
            return None, rejected
        self.check_dir()
        for step in self.steps():
            path = self.path(step)
            try:
                if path.lstat().st_uid != os.getuid():
                    raise Rejected(FOREIGN, "owned by another user")
                header = read_header(path)
                if header.step != step:
                    raise Rejected(CORRUPT, f"header says step {header.step}, the name {step}")
                check(header, expected)
            except FileNotFoundError:
                continue  # removed by a peer meanwhile
            except Rejected as e:
                rejected.append((path, e))
                continue
            return (header, path), rejected
        return None, rejected

    def discard(self, path: Path) -> None:
        self._unlink(path)

    def prune(self, upto: int | None = None) -> int:
        """Remove this run's files up to step ``upto`` (all of them, and any left-over
        temporary files, when None: the run is over); how many were removed."""
        removed = 0
        for step in self.steps():
            if upto is None or step <= upto:
                removed += self._unlink(self.path(step))
        return removed + self.sweep_temporary(everything=upto is None)

    def remove_run(self) -> int:
        """Remove every file of this run here — snapshots, half-written ones, and the progress
        records kept beside them (``service.train.restart_cost``) — once no process of the run is
        left; how many were removed."""
        run_prefix = f"ftdiff-{run_key(self.run_id)}-"
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return 0
        return sum(self._unlink(self.dir / name) for name in names if name.startswith(run_prefix))

    def sweep_old(self, max_age_s: float = MAX_AGE_S) -> int:
        """Remove every run's snapshot files here (this user's directory) older than
        ``max_age_s``; how many were removed."""
        removed, cutoff = 0, time.time() - max_age_s
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if entry.name.startswith("ftdiff-") and ".mem" in entry.name:
                try:
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        removed += self._unlink(Path(entry.path))
                except FileNotFoundError:
                    continue
        return removed

    def sweep_temporary(self, everything: bool = False) -> int:
        """Remove this run's half-written files whose writer is gone (killed mid-write), or
        all of them (``everything``); how many were removed."""
        removed = 0
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return 0
        for name in names:
            if not name.startswith(self.prefix) or ".mem.tmp-" not in name:
                continue
            pid = name.rsplit("-", 1)[1]
            if everything or not (pid.isdigit() and pid_alive(int(pid))):
                removed += self._unlink(self.dir / name)
        return removed

    @staticmethod
    def _unlink(path: Path) -> int:
        try:
            path.unlink()
            return 1
        except FileNotFoundError:
            return 0
