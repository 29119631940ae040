"""The worker-side checkpointer: snapshot, sharded write, commit, retention, verified resume.

Save (all ranks): take a snapshot of the registry into reused staging buffers (the only part
that blocks training when async), then in one background thread: DCP writes every rank's shards
and ``.metadata`` through the checksumming writer; the per-file checksums are gathered to rank 0,
which writes ``manifest.json`` and then the ``latest`` pointer; rank 0 tells every rank whether
the commit happened. All checkpoint collectives run on a dedicated gloo group so they never
interleave with the training group's all-reduces.

Load (all ranks): rank 0 finds the newest committed checkpoint and broadcasts its manifest;
every rank loads through the verifying reader. A corrupt checkpoint fails the load on all ranks
together (DCP gathers the error), is reported, and the next older committed one is tried.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from copy import deepcopy
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

import service
from service.checkpoint.catalog import Catalog, split_checkpoint_url
from service.checkpoint.direct_read import DirectFileReader
from service.checkpoint.dcp_io import (
    ChecksummingWriter,
    CorruptCheckpointError,
    VerifyingReader,
    verify_local_file,
)
from service.checkpoint.manifest import Manifest, ManifestError, step_dir
from service.checkpoint.retention import apply_retention
from service.checkpoint.storage import Storage, open_storage
from service.config import Config
from service.errors import UserError
from service.metrics import CheckpointMetrics
from service.train.distributed import DistInfo, new_gloo_group
from service.train.state import PER_RANK_KEYS, OptimizerState

log = logging.getLogger(__name__)

# DCP raises CheckpointException (a BaseException!) when any rank failed; catch it with the rest.
CHECKPOINT_ERRORS = (Exception, CheckpointException)

# checkpoint.writer_threads = 0 (automatic) on object stores: parallel upload streams per rank.
OBJECT_STORE_WRITER_THREADS = 4

# Test-only fault injection: FTDIFF_CRASH_AT="<stage>:<step>" kills this process with SIGKILL
# at that point of the commit protocol, so tests exercise real crashes at exact moments.
CRASH_STAGES = ("after_shards", "after_metadata", "after_manifest", "after_pointer")


def crash_point(stage: str, step: int) -> None:
    spec = os.environ.get("FTDIFF_CRASH_AT")
    if spec and spec == f"{stage}:{step}":
        log.warning("FTDIFF_CRASH_AT: killing this process at %s of step %d", stage, step)
        os.kill(os.getpid(), signal.SIGKILL)


class _CrashingWriter(ChecksummingWriter):
    """Adds the after_shards / after_metadata crash points around DCP's metadata write."""

    step = -1

    def finish(self, metadata: Any, results: Any) -> None:
        crash_point("after_shards", self.step)
        super().finish(metadata, results)
        crash_point("after_metadata", self.step)


class _Group:
    """Collectives of the checkpoint group, degrading to no-ops when running alone."""

    def __init__(self, info: DistInfo):
        self.info = info
        self.pg = new_gloo_group() if dist.is_initialized() else None

    def broadcast(self, obj: Any) -> Any:
        if self.pg is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.pg)
        return box[0]

    def from_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only and give every rank its result — or its error, so that a
        storage failure on rank 0 fails every rank instead of leaving them in a collective."""
        outcome: tuple[str, Any] | None = None
        if self.info.is_main:
            try:
                outcome = ("ok", fn())
            except UserError as e:
                outcome = ("user", str(e))
            except CHECKPOINT_ERRORS as e:
                outcome = ("error", _describe(e))
        outcome = self.broadcast(outcome)
        assert outcome is not None
        kind, value = outcome
        if kind == "user":
            raise UserError(value)
        if kind == "error":
            raise RuntimeError(value)
        return value

    def gather_to_all(self, obj: Any) -> list[Any]:
        if self.pg is None:
            return [obj]
        out: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(out, obj, group=self.pg)
        return out


def _versions() -> dict[str, str]:
    import diffusers

    return {"ftdiff": service.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


class Checkpointer:
    def __init__(
        self,
        cfg: Config,
        info: DistInfo,
        state: dict[str, Stateful],
        metrics: CheckpointMetrics | None = None,
    ):
        self.cfg, self.info, self.state, self.metrics = cfg, info, state, metrics
        ck = cfg.checkpoint
        self.storage = open_storage(ck.url, ck.endpoint_url, ck.region)
        self.catalog = Catalog(self.storage)
        self.group = _Group(info)
        self.last_committed_step: int | None = None
        # Committed steps this run failed to load (it fell back past them). When training
        # reaches such a step again, its save replaces the unusable folder instead of taking
        # "already committed" for an answer.
        self.unloadable_steps: set[int] = set()
        self.failures = 0
        self.skipped = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt")
        # Deletions get their own thread: unlinking hundreds of MB takes long enough that a
        # snapshot queued behind it would stall training (they are safe to overlap with a
        # save: retention never touches a folder newer than the newest commit).
        self._deleter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-retention")
        self._pending: concurrent.futures.Future[bool] | None = None
        self._staging: dict[str, torch.Tensor] = {}
        # Names of the tensors this rank wrote in its last save (None before the first). DCP
        # writes each replicated tensor from one rank only, and its plan is deterministic, so
        # the next save assigns the same share: the snapshot copies (and keeps buffers for)
        # only that share — 1/world of the replicated state per rank instead of all of it.
        self._share: set[str] | None = None
        self._pin = info.device.type == "cuda"
        self._snapshot_done: threading.Event | None = None
        self._warmed = False
        self._stall_so_far = 0.0
        self.last_stall_s = 0.0

    # -- save --------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """A save is still in flight on this rank."""
        return self._pending is not None and not self._pending.done()

    def maybe_save(self, step: int, samples_seen: int, busy_anywhere: bool = False) -> None:
        """Save if ``step`` is due. ``busy_anywhere`` must be the same on every rank (the trainer
        all-reduces ``busy``), so that with ``when_busy = "skip"`` all ranks skip together."""
        if step % self.cfg.checkpoint.every_steps:
            return
        if busy_anywhere and self.cfg.checkpoint.when_busy == "skip":
            self.skipped += 1
            if self.metrics:
                self.metrics.saves_skipped.inc()
            log.warning("checkpoint: skipping step %d, the previous save is still writing", step)
            return
        self.save(step, samples_seen, blocking=not self.cfg.checkpoint.async_)

    def save(self, step: int, samples_seen: int, *, blocking: bool) -> bool | None:
        """Save ``step``. Blocking: returns whether it committed. Async: returns None at once;
        the copy of the weights then overlaps the next forward/backward, and the trainer calls
        ``before_update()`` before the optimizer changes them."""
        t0 = time.monotonic()
        if self._pending is not None and not self._pending.done():
            # At most one save in flight: this one waits for the previous one (every rank
            # waits, since the previous save ends with a collective on all of them).
            self.skipped += 1
            if self.metrics:
                self.metrics.saves_skipped.inc()
            log.info("checkpoint: save of step %d waits for the previous one", step)
        self.wait()
        if blocking:
            return self._write(step, samples_seen, self._live_state(), t0)
        try:
            # References to the live tensors (and fresh tensors for counters and RNG), taken
            # now, so the snapshot describes exactly this step.
            refs = {key: obj.state_dict() for key, obj in self.state.items()}
        except CHECKPOINT_ERRORS as e:
            self._count_failure("snapshot", step, e)
            return None
        self._snapshot_done = threading.Event()
        self._stall_so_far = time.monotonic() - t0
        self._pending = self._executor.submit(self._snapshot_and_write, step, samples_seen, refs, t0)
        return None

    def warm_up(self) -> None:
        """Allocate the staging buffers in the background, ahead of the first async save.

        Allocating and faulting in the state's size of host memory (pinned, on CUDA: seconds
        for GBs) would otherwise stall that first save. Call after an optimizer step; cheap to
        call every step (it acts once). Only shapes are read on the background thread.
        """
        if self._warmed or not self.cfg.checkpoint.async_:
            return
        if any(isinstance(o, OptimizerState) and not o.optimizer.state for o in self.state.values()):
            # Asking for the state dict of an optimizer without state would make DCP create it
            # with a zero-learning-rate step, changing the run; wait for the first real step.
            return
        self._warmed = True
        refs = {key: obj.state_dict() for key, obj in self.state.items()}
        self._executor.submit(self._allocate_staging, refs)

    def _allocate_staging(self, refs: dict[str, Any]) -> None:
        try:
            for key, value in refs.items():
                self._stage(value, key, copy=False)
        except CHECKPOINT_ERRORS as e:  # the first save allocates what is missing
            log.warning("checkpoint: could not pre-allocate staging buffers: %s", _describe(e))

    def before_update(self) -> None:
        """Block until an in-flight snapshot has copied the weights (call before optimizer.step).

        Forward and backward only read the weights, so the copy runs alongside them; training
        stalls only for whatever part of the copy is not hidden behind them.
        """
        done = self._snapshot_done
        if done is None:
            return
        t0 = time.monotonic()
        done.wait()
        self._snapshot_done = None
        self.last_stall_s = self._stall_so_far + (time.monotonic() - t0)
        if self.metrics:
            self.metrics.save_duration.labels(phase="stall").observe(self.last_stall_s)

    def wait(self) -> bool | None:
        """Block until the in-flight save (if any) has finished; its commit status."""
        self.before_update()
        if self._pending is None:
            return None
        result = self._pending.result()
        self._pending = None
        return result

    def drain(self) -> None:
        """Wait for the in-flight save and all background work (staging warm-up, retention)."""
        self.wait()
        self._executor.submit(lambda: None).result()
        self._deleter.submit(lambda: None).result()

    def _live_state(self) -> dict[str, Any]:
        return {k: v for k, v in self.state.items()}

    def _snapshot_and_write(self, step: int, samples_seen: int, refs: dict[str, Any], t0: float) -> bool:
        try:
            snapshot = {key: self._stage(value, key) for key, value in refs.items()}
            if self._pin:
                torch.cuda.synchronize()
        except CHECKPOINT_ERRORS as e:
            self._count_failure("snapshot", step, e)
            # Every rank must still take part in the collectives of this save attempt, so a
            # rank whose copy failed joins with an error marker instead of skipping it.
            snapshot = None
        finally:
            assert self._snapshot_done is not None
            self._snapshot_done.set()
        return self._write(step, samples_seen, snapshot, t0)

    def _stage(self, obj: Any, path: str, copy: bool = True) -> Any:
        """Copy tensors into staging buffers allocated once and reused (pinned on CUDA).
        With ``copy=False`` only make sure the buffers exist, their pages faulted in.

        A tensor that another rank writes becomes a data-less placeholder of the same shape
        and dtype: DCP's plan stays the same on every rank, and should DCP ever ask this rank
        to write it after all, the save fails (it cannot read a placeholder) instead of
        writing weights that have moved on since the snapshot.
        """
        if isinstance(obj, torch.Tensor):
            if copy and self._share is not None and path not in self._share:
                return torch.empty(obj.shape, dtype=obj.dtype, device="meta")
            buf = self._staging.get(path)
            if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                buf = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=self._pin)
                if not copy:
                    buf.zero_()
                self._staging[path] = buf
            if copy:
                buf.copy_(obj.detach(), non_blocking=self._pin)
            return buf
        if isinstance(obj, dict):
            return {k: self._stage(v, f"{path}.{k}", copy) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._stage(v, f"{path}.{i}", copy) for i, v in enumerate(obj))
        return deepcopy(obj) if copy else None

    def _write(self, step: int, samples_seen: int, state: dict[str, Any] | None, t0: float) -> bool:
        """The commit protocol, on every rank. Returns whether ``step`` is now committed."""
        folder = step_dir(step)
        if not all(self.group.gather_to_all(state is not None)):
            return False  # some rank has no snapshot: nobody writes, nothing changes
        assert state is not None
        try:
            already = self.group.from_main(lambda: self._prepare_folder(step))
            if already:
                self.last_committed_step = step
                return True
            writer = _CrashingWriter(
                self.storage.fs, self.storage.path(folder), object_store=self.storage.is_object_store,
                thread_count=self._writer_threads(),
            )
            writer.step = step
            try:
                dcp.save(state, storage_writer=writer, process_group=self.group.pg)
            finally:
                self._learn_share(writer.planned_tensors)
            written = self.group.gather_to_all(writer.written)
        except CHECKPOINT_ERRORS as e:
            self._count_failure("write", step, e)
            return False
        if self.metrics:
            self.metrics.bytes_written.inc(sum(f.size for f in writer.written.values()))
        committed = False
        if self.info.is_main:
            committed = self._commit(step, samples_seen, written)
        try:
            committed = bool(self.group.broadcast(committed))
        except CHECKPOINT_ERRORS as e:
            self._count_failure("manifest", step, e)
            return False
        if committed:
            self.last_committed_step = step
            if self.metrics:
                self.metrics.last_committed_step.set(step)
                self.metrics.last_committed_timestamp.set(time.time())
                self.metrics.save_duration.labels(phase="commit").observe(time.monotonic() - t0)
            log.info("checkpoint: committed %s (%.2fs)", self.storage.url_of(folder), time.monotonic() - t0)
            if self.info.is_main:
                # In the background: deletions never delay a commit or the next snapshot.
                self._deleter.submit(self._retention)
        return committed

    def _writer_threads(self) -> int:
        configured = self.cfg.checkpoint.writer_threads
        if configured:
            return configured
        # Measured on S3 (bench/checkpoint.py): 4 parallel uploads per rank commit in 0.6x the
        # time of one; on file systems one stream per rank is as fast as several.
        return OBJECT_STORE_WRITER_THREADS if self.storage.is_object_store else 1

    def _learn_share(self, planned: set[str] | None) -> None:
        """Remember which tensors DCP had this rank write; drop the buffers of the others."""
        if planned is None:  # DCP failed before it planned: nothing learnt
            return
        self._share = planned
        self._staging = {k: v for k, v in self._staging.items() if k in planned}

    def _prepare_folder(self, step: int) -> bool:
        """Rank 0, before any rank writes: True if ``step`` is already committed (never write
        into a committed folder); otherwise clear debris of an earlier failed attempt. A
        committed folder this run could not load is uncommitted first, then replaced."""
        try:
            self.catalog.manifest(step)
        except ManifestError:
            self.storage.remove_tree(step_dir(step))  # debris of a failed attempt, if any
        else:
            if step not in self.unloadable_steps:
                return True
            log.warning("checkpoint: replacing %s, which could not be loaded", step_dir(step))
            self.catalog.delete(step)  # manifest first: never a half-deleted committed folder
        self.storage.makedirs(step_dir(step))
        return False

    def _commit(self, step: int, samples_seen: int, written: list[dict[str, Any]]) -> bool:
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
            config=self.cfg.to_dict(),
        )
        try:
            self.catalog.write_manifest(manifest)
        except CHECKPOINT_ERRORS as e:
            self._count_failure("manifest", step, e)
            return False
        crash_point("after_manifest", step)
        try:
            self.catalog.write_pointer(step)
        except CHECKPOINT_ERRORS as e:
            # The manifest is written, so the step *is* committed; discovery repairs the
            # stale pointer by scanning.
            self._count_failure("pointer", step, e)
        crash_point("after_pointer", step)
        return True

    def _retention(self) -> None:
        ck = self.cfg.checkpoint
        try:
            _, failed = apply_retention(self.catalog, ck.keep_last, ck.keep_every)
            if failed and self.metrics:
                self.metrics.failures.labels(stage="retention").inc(len(failed))
        except CHECKPOINT_ERRORS as e:
            self._count_failure("retention", None, e)

    def _count_failure(self, stage: str, step: int | None, err: BaseException | None = None) -> None:
        self.failures += 1
        if self.metrics:
            self.metrics.failures.labels(stage=stage).inc()
        what = f"step {step}" if step is not None else "checkpoint"
        log.error("checkpoint: %s failed at stage %s: %s", what, stage, _describe(err))

    # -- load --------------------------------------------------------------------------------
    def resume(self) -> int | None:
        """Load the checkpoint the config asks for into the registry; the loaded step or None."""
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            log.info("checkpoint.resume = never: starting fresh")
            return None
        if mode == "auto":
            catalog, pinned = self.catalog, None
        else:
            catalog, pinned = _catalog_for(mode, self.cfg)
        return self._load_newest(catalog, pinned)

    def _load_newest(self, catalog: Catalog, pinned: int | None) -> int | None:
        tried: list[str] = []
        candidate = self.group.from_main(lambda: self._first_candidate(catalog, pinned))
        if candidate is None:
            log.info("no committed checkpoint under %s: starting fresh", catalog.storage.display_url)
            return None
        while candidate is not None:
            step, manifest = candidate
            t0 = time.monotonic()
            try:
                self._load(catalog.storage, step, manifest)
            except CHECKPOINT_ERRORS as e:
                reason = _describe(e)
                log.error("checkpoint %s is unusable: %s", catalog.storage.url_of(step_dir(step)), reason)
                tried.append(f"{step_dir(step)}: {reason}")
                self.unloadable_steps.add(step)
                if self.metrics:
                    self.metrics.verify_failures.inc()
                    self.metrics.failures.labels(stage="load").inc()
                if pinned is not None:
                    break
                below = step
                candidate = self.group.from_main(lambda: self._older_candidate(catalog, below))
                continue
            if self.metrics:
                self.metrics.load_duration.observe(time.monotonic() - t0)
                self.metrics.last_committed_step.set(step)
                self.metrics.last_committed_timestamp.set(manifest.time)
            self.last_committed_step = step
            log.info("resumed from %s (world size %d -> %d)", catalog.storage.url_of(step_dir(step)),
                     manifest.world_size, self.info.world_size)
            return step
        raise UserError(
            f"checkpoints exist under {catalog.storage.display_url} but none could be loaded:\n  "
            + "\n  ".join(tried)
            + "\nRun `ftdiff ckpt verify` on it; to deliberately start from scratch set "
            "checkpoint.resume = \"never\" (or point checkpoint.url elsewhere)."
        )

    def _first_candidate(self, catalog: Catalog, pinned: int | None) -> tuple[int, Manifest] | None:
        if pinned is not None:
            try:
                return pinned, catalog.manifest(pinned)
            except ManifestError as e:
                raise UserError(f"checkpoint {catalog.storage.url_of(step_dir(pinned))}: {e}") from None
        return catalog.latest(self.cfg.checkpoint.every_steps)

    def _older_candidate(self, catalog: Catalog, below: int) -> tuple[int, Manifest] | None:
        for step in reversed(catalog.committed_steps()):
            if step < below:
                return step, catalog.manifest(step)
        return None

    def _load(self, storage: Storage, step: int, manifest: Manifest) -> None:
        # Per-rank state (RNG) only means something at the world size it was saved with.
        same_world = manifest.world_size == self.info.world_size
        state = {k: v for k, v in self.state.items() if same_world or k not in PER_RANK_KEYS}
        folder = storage.path(step_dir(step))
        if storage.protocol in ("file", "local"):
            self._load_local(state, folder, manifest)
        else:
            reader = VerifyingReader(storage.fs, folder, manifest.files)
            dcp.load(state, storage_reader=reader, process_group=self.group.pg)

    def _load_local(self, state: dict[str, Any], folder: str, manifest: Manifest) -> None:
        """Page-cache reads are cheap, so DCP reads its slices as usual while, alongside, each
        rank verifies its share of the files (CRC-32C over mmap, no copy). The ranks then agree
        on the verdict; a bad file fails the load on every rank, which falls back together."""
        names = sorted(manifest.files)[self.info.rank :: self.info.world_size]
        problems: list[str] = []

        def verify() -> None:
            for name in names:
                try:
                    verify_local_file(os.path.join(folder, name), manifest.files)
                except CorruptCheckpointError as e:
                    problems.append(str(e))

        checker = threading.Thread(target=verify, name="ckpt-verify", daemon=True)
        checker.start()
        load_error: BaseException | None = None
        try:
            dcp.load(state, storage_reader=DirectFileReader(folder), process_group=self.group.pg)
        except CHECKPOINT_ERRORS as e:  # a corrupt file may also break deserialisation
            load_error = e
        checker.join()
        verdicts = [p for p in self.group.gather_to_all("; ".join(problems) or None) if p]
        if verdicts:
            raise CorruptCheckpointError(folder, "; ".join(verdicts))
        if load_error is not None:
            raise load_error

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._executor.shutdown(wait=True)
            self._deleter.shutdown(wait=True)


def _catalog_for(url: str, cfg: Config) -> tuple[Catalog, int | None]:
    """A resume URL names a checkpoint root (its latest) or one step folder."""
    root, step = split_checkpoint_url(url)
    storage = open_storage(root, cfg.checkpoint.endpoint_url, cfg.checkpoint.region)
    return Catalog(storage), step


def _describe(err: BaseException | None) -> str:
    if err is None:
        return "unknown error"
    # DCP wraps per-rank failures; surface the first underlying cause.
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, inner = next(iter(failures.items()))
        inner_err = inner[0] if isinstance(inner, tuple) else inner
        return f"rank {rank}: {_describe(inner_err)}"
    if isinstance(err, CorruptCheckpointError):
        return str(err)
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"
