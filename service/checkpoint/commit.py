"""The commit protocol, run by every rank for one save.

(i) DCP writes every rank's shards and (ii) ``.metadata`` through the checksumming writer
(shard names carry the writer's incarnation);
the per-file sizes and CRC-32Cs are gathered to rank 0, which writes (iii) ``manifest.json``
and then (iv) the ``latest`` pointer, and tells every rank whether the commit happened. A crash
between any two stages leaves the previous commit the newest (between iii and iv: a committed
step behind a stale pointer, which discovery repairs). Rank 0 prepares the folder before any
rank writes: it never writes into a committed folder and clears debris of a failed attempt.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

import service
from service import faults
from service.checkpoint.collectives import CHECKPOINT_ERRORS, fenced_cause
from service.checkpoint.context import CheckpointContext
from service.checkpoint.dcp_io import ChecksummingWriter
from service.checkpoint.errors import FencedError, ManifestError
from service.checkpoint.manifest import Manifest, step_dir
from service.checkpoint.storage_health import storage_verdict
from service.errors import StorageError

log = logging.getLogger(__name__)


class _FencedWriter(ChecksummingWriter):
    """The writer, fenced before DCP's ``.metadata`` (written by rank 0 in ``finish``), with
    the after_shards / after_metadata crash points around it."""

    step = -1
    fence: Callable[[str], None] = staticmethod(lambda what: None)

    def finish(self, metadata: Any, results: Any) -> None:
        faults.crash_point("after_shards", self.step)
        self.fence("writing .metadata")
        super().finish(metadata, results)
        faults.crash_point("after_metadata", self.step)


class CommitProtocol:
    def __init__(self, ctx: CheckpointContext):
        self.ctx = ctx
        self.cfg, self.info, self.catalog, self.group = ctx.cfg, ctx.info, ctx.catalog, ctx.group
        self.ownership, self.run_id, self.fingerprint = ctx.ownership, ctx.run_id, ctx.fingerprint
        self.storage, self.staging, self.telemetry = ctx.storage, ctx.staging, ctx.telemetry
        # Steps this process committed itself: the only folders it may take as already done.
        self.committed_here: set[int] = set()
        # Set on SIGTERM: probing a refusing store stops at once (see storage_health).
        self.stop_probing = threading.Event()
        # Rank 0: why the store must be given up on, found outside a save (retention could not
        # delete and the store kept refusing); every rank learns it at the next save.
        self.refusal: str | None = None

    def writer_threads(self) -> int:
        configured = self.cfg.checkpoint.writer_threads
        if configured:
            return configured
        return self.storage.backend.default_writer_threads

    def write(self, step: int, samples_seen: int, state: dict[str, Any] | None, since: float,
              notes: dict[str, Any] | None = None) -> bool:
        """Every rank: write ``state`` as ``step`` and commit it. Whether ``step`` is committed.
        ``state`` is None on a rank whose snapshot failed: then nobody writes. A failed write
        whose store then keeps refusing raises StorageError on every rank (the job stops)."""
        # One collective tells every rank whether all have a snapshot, and rank 0's refusal.
        ready = self.group.gather_to_all((state is not None, self.refusal))
        if ready[0][1] is not None:
            raise StorageError(ready[0][1], permanent=True)
        if not all(has_state for has_state, _ in ready):
            return False
        assert state is not None
        committed = self._write(step, samples_seen, state, since, notes or {})
        if not committed:
            self._stop_if_storage_gone()
        return committed

    def _stop_if_storage_gone(self) -> None:
        """Every rank, after a failed save: rank 0 probes the store again (backed off, for at
        most checkpoint.storage_retry_s); if it still denies access or its bucket is gone,
        every rank raises StorageError (exit code 3)."""
        ck = self.cfg.checkpoint
        reason = self.group.from_main(
            lambda: storage_verdict(self.storage, ck.single_writer, ck.storage_retry_s, self.stop_probing))
        if reason is not None:
            raise StorageError(reason, permanent=True)

    def _write(self, step: int, samples_seen: int, state: dict[str, Any], since: float,
               notes: dict[str, Any]) -> bool:
        try:
            if self.group.from_main(lambda: self._prepare_folder(step)):
                return True  # already committed by an earlier attempt: never rewritten
            writer = _FencedWriter.for_folder(
                self.storage, step_dir(step), thread_count=self.writer_threads(),
                file_tag=f"i{self.ownership.number}" if self.ownership.number else "",
                counter=self.ctx.bytes_moved,
            )
            writer.step, writer.fence = step, self.catalog.fence
            writer.fs.fence = self.catalog.fence  # and every file operation of the writer
            try:
                dcp.save(state, storage_writer=writer, process_group=self.group.pg)
            finally:
                self.staging.learn_share(writer.planned_tensors)
            written = self.group.gather_to_all(writer.written)
        except CHECKPOINT_ERRORS as e:
            fenced = fenced_cause(e)
            if fenced is not None:
                raise fenced from None  # superseded: nothing this process writes counts any more
            self.telemetry.failure("write", step, e)
            return False
        self.telemetry.bytes_written(sum(f.size for f in writer.written.values()))
        outcome = self._commit(step, samples_seen, written, notes) if self.info.is_main else None
        try:
            outcome = self.group.broadcast(outcome)
        except CHECKPOINT_ERRORS as e:
            self.telemetry.failure("manifest", step, e)
            return False
        if isinstance(outcome, str):
            raise FencedError(outcome)
        committed = bool(outcome)
        if committed:
            self.committed_here.add(step)
            self.telemetry.committed(step, since)
            log.info("checkpoint: committed %s (%.2fs)", self.storage.url_of(step_dir(step)),
                     time.monotonic() - since)
        return committed

    def _prepare_folder(self, step: int) -> bool:
        """Rank 0, before any rank writes. True if this very start already committed ``step``.
        Otherwise the folder is made ready: debris of a failed attempt is removed, and a
        folder committed by anyone else — an earlier start whose commit this one could not
        load or fell back past — is uncommitted (manifest first) and replaced: a save never
        reports "committed" for files it did not write. Only the newest start gets here
        (every change is fenced), so what it writes is this run's truth for ``step``."""
        try:
            self.catalog.manifest(step)
        except ManifestError:
            self.catalog.remove_debris(step)
        else:
            if step in self.committed_here and step not in self.ctx.unloadable_steps:
                return True
            why = "could not be loaded" if step in self.ctx.unloadable_steps else "was written by an earlier start"
            log.warning("checkpoint: replacing %s, which %s", step_dir(step), why)
            self.catalog.delete(step)
        self.storage.makedirs(step_dir(step))
        return False

    def _commit(self, step: int, samples_seen: int, written: list[dict[str, Any]],
                notes: dict[str, Any]) -> bool | str:
        """Rank 0: the manifest (which makes the step committed), then the pointer. Whether it
        committed — or, if this process was superseded, the reason (every rank raises it)."""
        files: dict[str, Any] = {}
        for entries in written:
            files.update(entries)
        manifest = Manifest(
            step=step,
            world_size=self.info.world_size,
            config_hash=self.cfg.hash(),
            files=files,
            versions=_versions(),
            samples_seen=samples_seen,
            config=self.cfg.redacted_dict(),
            run_id=self.run_id,
            incarnation=self.ownership.number,
            fingerprint=self.fingerprint,
            lineage=self.ctx.lineage,
            **notes,  # Manifest fields the trainer adds (suspect_since, skips)
        )
        try:
            self.catalog.write_manifest(manifest)
        except FencedError as e:
            return str(e)
        except CHECKPOINT_ERRORS as e:
            self.telemetry.failure("manifest", step, e)
            return False
        faults.crash_point("after_manifest", step)
        try:
            self.catalog.write_pointer(step)
        except FencedError as e:
            return str(e)  # committed, but superseded right after: this process stops here
        except CHECKPOINT_ERRORS as e:
            # The manifest is written, so the step *is* committed; the pointer is only a hint
            # (discovery lists the folders at or above it).
            self.telemetry.failure("pointer", step, e)
        faults.crash_point("after_pointer", step)
        return True


def _versions() -> dict[str, str]:
    import diffusers

    return {"ftdiff": service.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__}
