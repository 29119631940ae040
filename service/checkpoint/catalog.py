"""Finding, describing and verifying committed checkpoints under one root.

Used by the workers (resume), the retention policy and the ``ftdiff ckpt`` commands. Finding the
latest costs three requests in the normal case (pointer, one listing, manifest), however many
checkpoints exist.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from service.checkpoint.dcp_io import ByteCounter, read_verified_file
from service.checkpoint.errors import CorruptCheckpointError, ManifestError
from service.checkpoint.manifest import (
    MANIFEST,
    POINTER,
    Manifest,
    parse_pointer,
    parse_step_dir,
    pointer_json,
    step_dir,
)
from service.checkpoint.safe_pickle import check_metadata_files
from service.checkpoint.storage import Storage

log = logging.getLogger(__name__)


def split_checkpoint_url(url: str) -> tuple[str, int | None]:
    """``URL`` (a run's root) or ``URL/step-N`` -> (root, step, or None for "the latest").

    ``step-150`` and ``step-000000150`` name the same checkpoint: users type the short form,
    listings print the long one.
    """
    trimmed = url.rstrip("/")
    head, sep, last = trimmed.rpartition("/")
    step = parse_step_dir(last, canonical=False)
    if step is None or head.endswith(":/"):  # s3://step-4 is a bucket, not a step
        return trimmed, None
    if not sep:  # a bare "step-N": the run's root is the current directory
        return ".", step
    return (head or "/"), step


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    committed: bool
    path: str
    bytes: int
    time: float | None

    def to_json(self) -> dict[str, object]:
        return {
            "step": self.step,
            "committed": self.committed,
            "path": self.path,
            "bytes": self.bytes,
            "time": self.time,
        }


class Catalog:
    def __init__(self, storage: Storage, fence: Callable[[str], None] | None = None):
        """``fence(what)`` runs before every change and raises if this writer may no longer
        change the root (see ``ownership``); read-only users pass none."""
        self.storage = storage
        self.fence = fence or (lambda what: None)

    # -- reading ---------------------------------------------------------------------------
    def manifest(self, step: int) -> Manifest:
        """The manifest of ``step``; ManifestError if the folder is not committed."""
        try:
            data = self.storage.read_bytes(f"{step_dir(step)}/{MANIFEST}")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ManifestError(f"{step_dir(step)} has no {MANIFEST} (not committed)") from None
        manifest = Manifest.from_json(data)
        if manifest.step != step:
            raise ManifestError(f"{step_dir(step)}/{MANIFEST} names step {manifest.step}")
        return manifest

    def step_folders(self) -> list[int]:
        """Steps of every step-N folder, committed or not, ascending (one listing)."""
        steps = (parse_step_dir(name) for name in self.storage.list_dir())
        return sorted(s for s in steps if s is not None)

    def committed_steps(self) -> list[int]:
        """Steps with a valid manifest, ascending (a listing plus one read per folder)."""
        committed = []
        for step in self.step_folders():
            try:
                self.manifest(step)
                committed.append(step)
            except ManifestError:
                continue
        return committed

    def pointer_step(self) -> int | None:
        try:
            return parse_pointer(self.storage.read_bytes(POINTER))
        except FileNotFoundError:
            return None

    def latest(self) -> tuple[int, Manifest] | None:
        """The newest committed checkpoint, or None if there is none.

        The pointer is a hint, never the authority: read it, list the step folders once, and
        take the newest folder at or above the pointer that has a valid manifest — three
        requests in the normal case (pointer, listing, manifest), however many checkpoints
        exist. A commit whose pointer write was lost, an off-interval emergency commit, a
        stale or garbage pointer: all are found by the same listing.
        """
        hint = self.pointer_step()
        folders = self.step_folders()
        at_or_above = [s for s in folders if hint is None or s >= hint]
        below = [s for s in folders if hint is not None and s < hint]
        for candidate in reversed(at_or_above):
            found = self._committed(candidate)
            if found is not None:
                if hint is not None and candidate > hint:
                    log.info("checkpoint pointer names step %d; step %d is committed and newer", hint, candidate)
                return candidate, found
        if hint is not None:
            log.warning("checkpoint pointer names step %d, which is not committed; scanning", hint)
        for candidate in reversed(below):
            found = self._committed(candidate)
            if found is not None:
                return candidate, found
        return None

    def _committed(self, step: int) -> Manifest | None:
        try:
            return self.manifest(step)
        except ManifestError:
            return None

    def describe(self) -> list[CheckpointInfo]:
        """Every step folder, committed or partial, for ``ftdiff ckpt ls``. Paths are shown
        without credentials: this output goes to terminals, CI logs and tickets."""
        infos = []
        for step in self.step_folders():
            where = self.storage.display_url + "/" + step_dir(step)
            try:
                m = self.manifest(step)
                infos.append(CheckpointInfo(step, True, where, m.total_bytes, m.time))
            except ManifestError:
                infos.append(CheckpointInfo(step, False, where, self._folder_bytes(step), None))
        return infos

    def _folder_bytes(self, step: int) -> int:
        return self.storage.tree_bytes(step_dir(step))

    def verify(self, step: int, counter: ByteCounter | None = None) -> list[str]:
        """Every problem with ``step`` (empty list: committed and intact). Reads every byte
        (counted in ``counter``)."""
        try:
            manifest = self.manifest(step)
        except ManifestError as e:
            return [str(e)]
        problems = []
        folder = step_dir(step)
        for name in sorted(manifest.files):
            try:
                data = read_verified_file(self.storage, f"{folder}/{name}", manifest.files, counter)
                if name == ".metadata":  # intact bytes can still be a hostile pickle
                    check_metadata_files(data, f"{folder}/{name}", set(manifest.files))
            except CorruptCheckpointError as e:
                problems.append(f"{folder}/{name}: {e.reason}")
        return problems

    # -- writing (rank 0 only; every change goes through the fence first) --------------------
    def write_manifest(self, manifest: Manifest) -> None:
        self.fence("committing")
        self.storage.write_bytes_atomic(f"{step_dir(manifest.step)}/{MANIFEST}", manifest.to_json())

    def write_pointer(self, step: int) -> bool:
        """Point ``latest`` at ``step``, unless it already names a newer committed step (it never
        moves backwards; a pointer naming nothing committed is replaced). On S3 the write is conditional on the pointer read being still current.
        Returns whether the pointer now names ``step``."""
        version = self.storage.version(POINTER)
        current = self.pointer_step()
        if current is not None and current > step and self._committed(current) is not None:
            log.warning("checkpoint pointer already names step %d; not moving it back to %d", current, step)
            return False
        self.fence("moving the latest pointer")
        self.storage.write_bytes_atomic(POINTER, pointer_json(step), if_version=version)
        return True

    def remove_debris(self, step: int) -> None:
        """Remove an uncommitted step folder (a failed attempt's files)."""
        if self.storage.exists(step_dir(step)):
            self.fence("removing debris")
            self.storage.remove_tree(step_dir(step))

    def delete(self, step: int) -> None:
        """Uncommit first (manifest), then remove the rest: a half-deleted folder never
        looks committed."""
        self.fence("deleting")
        manifest = f"{step_dir(step)}/{MANIFEST}"
        if self.storage.exists(manifest):
            self.storage.remove(manifest)
        self.storage.remove_tree(step_dir(step))
