"""Finding, describing and verifying committed checkpoints under one root.

Used by the workers (resume), the retention policy and the ``ftdiff ckpt`` commands. Finding the
latest costs two reads in the normal case (pointer, manifest), however many checkpoints exist;
a missing, stale or corrupt pointer falls back to one listing of the root.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from service.checkpoint.dcp_io import CorruptCheckpointError, read_verified
from service.checkpoint.manifest import (
    MANIFEST,
    POINTER,
    Manifest,
    ManifestError,
    parse_pointer,
    parse_step_dir,
    pointer_json,
    step_dir,
)
from service.checkpoint.storage import Storage

log = logging.getLogger(__name__)


def split_checkpoint_url(url: str) -> tuple[str, int | None]:
    """``URL`` (a run's root) or ``URL/step-N`` -> (root, step, or None for "the latest")."""
    trimmed = url.rstrip("/")
    step = parse_step_dir(trimmed.rsplit("/", 1)[-1])
    return (trimmed.rsplit("/", 1)[0] if step is not None else trimmed), step


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
    def __init__(self, storage: Storage):
        self.storage = storage

    # -- reading ---------------------------------------------------------------------------
    def manifest(self, step: int) -> Manifest:
        """The manifest of ``step``; ManifestError if the folder is not committed."""
        try:
            data = self.storage.read_bytes(f"{step_dir(step)}/{MANIFEST}")
        except FileNotFoundError:
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

    def latest(self, interval: int | None = None) -> tuple[int, Manifest] | None:
        """The newest committed checkpoint, or None if there is none.

        Normal case: read the pointer, read its manifest, and (given the save ``interval``)
        check that the next checkpoint has no manifest — three requests. The pointer is written
        after the manifest, so a crash in between leaves it one commit behind: that stale case,
        like a missing or corrupt pointer, is resolved by one scan of the folders.
        """
        step = self.pointer_step()
        if step is not None:
            try:
                manifest = self.manifest(step)
                if interval is None or not self.storage.exists(f"{step_dir(step + interval)}/{MANIFEST}"):
                    return step, manifest
                log.warning("checkpoint pointer names step %d but a newer commit exists; scanning", step)
            except ManifestError as e:
                log.warning("checkpoint pointer names step %d, which is unusable (%s); scanning", step, e)
        else:
            log.debug("no usable pointer under %s; scanning", self.storage.display_url)
        for candidate in reversed(self.step_folders()):
            try:
                return candidate, self.manifest(candidate)
            except ManifestError:
                continue
        return None

    def describe(self) -> list[CheckpointInfo]:
        infos = []
        for step in self.step_folders():
            try:
                m = self.manifest(step)
                infos.append(CheckpointInfo(step, True, self.storage.url_of(step_dir(step)), m.total_bytes, m.time))
            except ManifestError:
                size = self._folder_bytes(step)
                infos.append(CheckpointInfo(step, False, self.storage.url_of(step_dir(step)), size, None))
        return infos

    def _folder_bytes(self, step: int) -> int:
        return self.storage.tree_bytes(step_dir(step))

    def verify(self, step: int) -> list[str]:
        """Every problem with ``step`` (empty list: committed and intact). Reads every byte."""
        try:
            manifest = self.manifest(step)
        except ManifestError as e:
            return [str(e)]
        problems = []
        folder = step_dir(step)
        for name in sorted(manifest.files):
            try:
                read_verified(self.storage.fs, self.storage.path(folder, name), manifest.files)
            except CorruptCheckpointError as e:
                problems.append(f"{folder}/{name}: {e.reason}")
        return problems

    # -- writing (rank 0 only) -------------------------------------------------------------
    def write_manifest(self, manifest: Manifest) -> None:
        self.storage.write_bytes_atomic(f"{step_dir(manifest.step)}/{MANIFEST}", manifest.to_json())

    def write_pointer(self, step: int) -> None:
        self.storage.write_bytes_atomic(POINTER, pointer_json(step))

    def delete(self, step: int) -> None:
        """Uncommit first (manifest), then remove the rest: a half-deleted folder never
        looks committed."""
        manifest = f"{step_dir(step)}/{MANIFEST}"
        if self.storage.exists(manifest):
            self.storage.remove(manifest)
        self.storage.remove_tree(step_dir(step))
