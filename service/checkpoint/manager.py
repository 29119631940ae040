"""The worker's checkpointer: one small object the training loop calls.

The loop makes one call after every step, ``save(step, samples_seen, last_step=...)``, and the
checkpointer decides what is due: nothing, an (async) periodic save, or — on the last step,
normal or emergency — a blocking commit that must succeed. Underneath, the phases live apart:
``snapshot`` (staging copy), ``commit`` (the commit protocol), ``resume`` (verified load with
fallback), ``collectives`` (the dedicated gloo group), ``retention`` (deletions),
``memory_recovery`` (the node-local memory tier: state left by the survivors of a crash).

Async save: ``save`` takes references to the live state and returns; a background thread
copies it into the staging buffers while the next forward/backward runs (they only read the
weights), and the trainer calls ``before_update()`` before ``optimizer.step()`` to wait for
whatever part of the copy is not done. The same thread then runs the commit protocol. At most
one save is in flight.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

from torch.distributed.checkpoint.stateful import Stateful

from service.checkpoint.collectives import (
    CHECKPOINT_ERRORS,
    describe_error,
)
from service.checkpoint.commit import CommitProtocol
from service.checkpoint.context import CheckpointContext
from service.checkpoint.errors import CheckpointNotCommitted, FencedError
from service.checkpoint.memory_recovery import MemoryRecovery
from service.checkpoint.memory_tier import MemoryTier
from service.checkpoint.resume import Resumer
from service.checkpoint.retention import apply_retention
from service.checkpoint.rollback import Rollback
from service.checkpoint.storage_health import storage_verdict
from service.config import Config
from service.dist import DistInfo
from service.errors import UserError
from service.metrics import CheckpointMetrics
from service.vocabulary import StateSource

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(
        self,
        cfg: Config,
        info: DistInfo,
        state: dict[str, Stateful],
        metrics: CheckpointMetrics | None = None,
        *,
        per_rank_keys: Collection[str],
        can_read_state: Callable[[], bool],
        fingerprint: dict[str, Any] | None = None,
    ):
        """``per_rank_keys``: state entries that differ per rank (restored only at the same world
        size). ``can_read_state``: whether asking every entry for its state dict is harmless
        now (DCP gives an optimizer without state one by running a zero-lr step, which would
        change the run), checked before staging buffers are allocated ahead of time.
        ``fingerprint``: the settings that define the run's math (``identity.fingerprint``)."""
        self.ctx = ctx = CheckpointContext.open(cfg, info, state, metrics, per_rank_keys, fingerprint)
        self.cfg, self.info, self.state = cfg, info, state
        self.storage, self.ownership, self.catalog = ctx.storage, ctx.ownership, ctx.catalog
        self.telemetry, self.staging, self.group = ctx.telemetry, ctx.staging, ctx.group
        self.commits = CommitProtocol(ctx)
        self.resumer = Resumer(ctx)
        self.rollback = Rollback(ctx, self.resumer, self.commits.committed_here)
        # The memory tier needs a run id: without one, no restart could tell its own state from
        # another run's.
        self.memory: MemoryRecovery | None = None
        ck = cfg.checkpoint
        if ck.memory_tier and info.run_id:
            self.memory = MemoryRecovery(ctx, MemoryTier(info.run_id, ck.memory_tier_dir),
                                         lambda: self.ownership.number, can_read_state)
        self.last_committed_step: int | None = None
        self.resume_source = StateSource.FRESH
        self.is_restart = False
        """Whether this start continues a run that already started (same run id and root)."""
        self.last_stall_s = 0.0
        self._can_read_state = can_read_state
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt")
        # Deletions get their own thread: unlinking hundreds of MB takes long enough that a
        # snapshot queued behind it would stall training (they are safe to overlap with a
        # save: retention never touches a folder newer than the newest commit).
        self._deleter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-retention")
        self._pending: concurrent.futures.Future[bool] | None = None
        self._snapshot_done: threading.Event | None = None
        self._warmed = False
        self._stall_so_far = 0.0
        # Manifest fields the trainer adds, as of the moment a save is taken (service.train.guard).
        self.notes: Callable[[], dict[str, Any]] = dict

    @property
    def failures(self) -> int:
        return self.telemetry.failures

    @property
    def skipped(self) -> int:
        return self.telemetry.skipped

    @property
    def io_bytes(self) -> int:
        """Checkpoint bytes this process has read and written so far (progress in a long I/O)."""
        return self.ctx.bytes_moved.total

    @property
    def busy(self) -> bool:
        """A save is still in flight on this rank."""
        return self._pending is not None and not self._pending.done()

    # -- the loop's calls ------------------------------------------------------------------
    def resume(self) -> int | None:
        """Load the checkpoint the config asks for (the run's newest commit on a restart), then
        claim this start's incarnation of the root; the loaded step, or None for a fresh start.
        A start that is refused (another run's root, changed settings) claims nothing, so it
        cannot fence off a job that is still running there."""
        restart = self.group.from_main(self._is_restart)
        self.is_restart = restart
        self.ctx.lineage = self.group.from_main(self.resumer.own_lineage)  # a fork stays one
        # A restart of this run first looks for newer state that survivors left in memory; a
        # first start (pinned, never, auto) always goes by the object store.
        step = self._resume_from_memory() if restart and self.memory is not None else None
        if step is None:
            step = self.resumer.resume(restart=restart)
            if step is not None:
                self.last_committed_step = step
            self.resume_source = StateSource.OBJECT_STORE if step is not None else StateSource.FRESH
            self.telemetry.resumed_from(self.resume_source)
        if self.memory is not None:
            self.memory.committed(self.last_committed_step)  # older snapshots are of no more use
            self.memory.consistent_at(step or 0)
        self._claim()
        if not restart and self.cfg.checkpoint.resume == "never":
            # Two fresh runs that checked an empty root at the same moment both got this far;
            # their claims are now both visible, so each sees the other and neither trains.
            self.group.from_main(self._check_alone)
        return step

    def save(self, step: int, samples_seen: int, *, last_step: bool = False, emergency: bool = False,
             busy_anywhere: bool = False) -> None:
        """Called after every optimizer step; saves what is due.

        ``last_step``: the run ends after this step (``max_steps``, or an agreed stop when
        ``emergency``): the step is committed, blocking, or ``CheckpointNotCommitted`` is raised.
        ``busy_anywhere`` must be the same on every rank (the trainer all-reduces ``busy``), so
        that with ``when_busy = "skip"`` all ranks skip together.
        """
        ck = self.cfg.checkpoint
        if last_step or emergency:
            self.wait()
            if self.last_committed_step != step and not self.save_at(step, samples_seen, blocking=True):
                what = "emergency checkpoint" if emergency else "final checkpoint"
                raise CheckpointNotCommitted(f"{what} at step {step} could not be committed")
            if self.memory is not None:  # the run is over (or its last step is in storage)
                self.memory.committed(step, run_finished=last_step and not emergency)
            return
        if step % ck.every_steps == 0:
            if busy_anywhere and ck.when_busy == "skip":
                self.telemetry.skipped_save()
                log.warning("checkpoint: skipping step %d, the previous save is still writing", step)
            else:
                self.save_at(step, samples_seen, blocking=not ck.async_)
        self.warm_up()  # staging buffers ready before the first async save

    def roll_back(self, at_most: int, record: tuple[int, list[list[int]]]) -> int | None:
        """Every rank: back to the newest good commit at or before ``at_most`` (loaded; later ones and
        memory-tier snapshots forgotten; ``record``: rollbacks so far and skip windows); its step, or None."""
        self.wait()
        if self.memory is not None:  # being replaced: never left in the memory tier until rolled_back()
            self.memory.updating()
        step = self.rollback.to_newest_before(at_most, record)
        if step is not None:
            self.last_committed_step = step
            if self.memory is not None:
                self.memory.rolled_back(step)
        return step

    def before_update(self) -> None:
        """Block until an in-flight snapshot has copied the weights (call before optimizer.step).

        Forward and backward only read the weights, so the copy runs alongside them; training
        stalls only for whatever part of the copy is not hidden behind them. From here until
        ``update_done`` the state is being changed, and never left in the memory tier.
        """
        if self.memory is not None:
            self.memory.updating()
        self._wait_for_copy()

    def update_done(self, step: int) -> None:
        """The update of ``step`` is fully applied (weights, optimizer, LR, EMA, counters): the
        state is consistent at ``step`` again, and may be left in the memory tier."""
        if self.memory is not None:
            self.memory.consistent_at(step)
            every = self.cfg.checkpoint.memory_every_steps
            if every and step % every == 0:
                self.memory.leave_soon(f"every {every} steps")

    def leave_in_memory(self, why: str) -> bool:
        """Leave the last completed step in the memory tier now (any thread); whether a file
        was written. For a restart the supervisor ordered: the main thread is then stuck in a
        collective with a hung peer, its state consistent at the last step every rank did."""
        return self.memory is not None and self.memory.leave(why)

    def watch_stop_signals(self, then: dict[int, Callable[[], None]] | None = None) -> bool:
        """Main thread, after the SIGTERM/SIGINT handlers are installed: leave the state in the
        memory tier as soon as one arrives, even if the main thread is stuck in a collective;
        for the signals in ``then``, leave it and call their action. False without a memory
        tier (nothing watches the signals then)."""
        if self.memory is None:
            return False
        self.memory.watch_signals(then)
        return True

    def _wait_for_copy(self) -> None:
        done = self._snapshot_done
        if done is None:
            return
        t0 = time.monotonic()
        done.wait()
        self._snapshot_done = None
        self.last_stall_s = self._stall_so_far + (time.monotonic() - t0)
        self.telemetry.stalled(self.last_stall_s)

    def warm_up(self) -> None:
        """Allocate the staging buffers in the background, ahead of the first async save.

        Allocating and faulting in the state's size of host memory (pinned, on CUDA: seconds
        for GBs) would otherwise stall that first save. Cheap to call every step (it acts once).
        """
        if self._warmed or not self.cfg.checkpoint.async_ or not self._can_read_state():
            return
        self._warmed = True
        refs = {key: obj.state_dict() for key, obj in self.state.items()}
        self._executor.submit(self._allocate_staging, refs)

    # -- explicit saves (the loop goes through save(); benches and tests call these) -----------
    def save_at(self, step: int, samples_seen: int, *, blocking: bool) -> bool | None:
        """Save ``step`` now. Blocking: returns whether it committed. Async: returns None at once."""
        t0 = time.monotonic()
        self._claim()
        if self.busy:
            # At most one save in flight: this one waits for the previous one (every rank
            # waits, since the previous save ends with a collective on all of them).
            self.telemetry.skipped_save()
            log.info("checkpoint: save of step %d waits for the previous one", step)
        self.wait()
        if blocking:
            return self._committed(step, self.commits.write(step, samples_seen, dict(self.state), t0, self.notes()))
        try:
            # References to the live tensors (and fresh tensors for counters and RNG), taken
            # now, so the snapshot describes exactly this step.
            refs = {key: obj.state_dict() for key, obj in self.state.items()}
        except CHECKPOINT_ERRORS as e:
            self.telemetry.failure("snapshot", step, e)
            return None
        self._snapshot_done = threading.Event()
        self._stall_so_far = time.monotonic() - t0
        self._pending = self._executor.submit(self._snapshot_and_write, step, samples_seen, refs, t0, self.notes())
        return None

    def wait(self) -> bool | None:
        """Block until the in-flight save (if any) has finished; its commit status."""
        self._wait_for_copy()
        if self._pending is None:
            return None
        pending, self._pending = self._pending, None
        return pending.result()

    def drain(self) -> None:
        """Wait for the in-flight save and all background work (staging warm-up, retention)."""
        self.wait()
        self._executor.submit(lambda: None).result()
        self._deleter.submit(lambda: None).result()

    def close(self) -> None:
        if self.memory is not None:
            # First, before anything that may wait on a dead peer: on a failure (a peer died
            # and a collective raised), leave the last completed step for the restart. A no-op
            # when that step is committed (normal end, emergency stop).
            self.memory.leave("exit")
            self.memory.stop_watching()
        try:
            self.drain()
        except FencedError as e:  # already reported by whoever waited on the save
            log.warning("checkpoint: %s", e)
        finally:
            self._executor.shutdown(wait=True)
            self._deleter.shutdown(wait=True)

    # -- ownership ---------------------------------------------------------------------------
    def _is_restart(self) -> bool:
        """Rank 0: is this start a restart of a run that already claimed this root (a torchrun
        restart or a relaunch carries the same run id)? A run that another start superseded
        since does not take the root back: that would fence off the newer owner."""
        run_id = self.info.run_id
        records = self.ownership.records()
        mine = run_id is not None and any(r.run_id == run_id for r in records)
        if mine and records[-1].run_id != run_id:
            newest = records[-1]
            raise UserError(
                f"this run ({run_id}) was superseded at {self.storage.display_url}: its newest start "
                f"(incarnation {newest.number}) belongs to run {newest.run_id or 'unknown'}, which now "
                "owns the root. A superseded run does not take it back; start a new run (ftdiff train "
                "again, or a new job) to continue from the newest commit."
            )
        return mine

    def _check_alone(self) -> None:
        mine = self.ownership.number
        others = [r for r in self.ownership.records() if r.number != mine and r.run_id != self.info.run_id]
        if others:
            raise UserError(
                f"checkpoint.resume = \"never\": another run ({others[-1].run_id or 'unknown'}) claimed "
                f"{self.storage.display_url} at the same moment; a fresh run never shares a root. Point "
                "checkpoint.url at a new location."
            )

    def _claim(self) -> None:
        """Every rank, once: rank 0 claims the next incarnation of the root (fencing off every
        older writer) and tells everyone its number."""
        if self.ownership.number is not None:
            return
        self.ownership.number = self.group.from_main(self._claim_on_main)

    def _resume_from_memory(self) -> int | None:
        """Every rank: the step resumed from the memory tier, or None (then: object store)."""
        assert self.memory is not None
        newest = self.group.from_main(self._newest_commit)
        step = self.memory.resume(newest)
        if step is not None:
            self.last_committed_step = newest[0] if newest is not None else None
            self.resume_source = StateSource.MEMORY
            self.telemetry.resumed_from(StateSource.MEMORY)
        return step

    def _newest_commit(self) -> tuple[int, int | None] | None:
        """Rank 0: the newest commit's step and the incarnation that wrote it."""
        found = self.catalog.latest()
        return (found[0], found[1].incarnation) if found is not None else None

    def _claim_on_main(self) -> int:
        found = self.catalog.latest()
        seen = found[1].incarnation or 0 if found is not None else 0
        number = self.ownership.claim(self.info.run_id, at_least=seen)
        log.info("checkpoint root %s: incarnation %d", self.storage.display_url, number)
        return number

    # -- background work ---------------------------------------------------------------------
    def _snapshot_and_write(self, step: int, samples_seen: int, refs: dict[str, Any], t0: float,
                            notes: dict[str, Any]) -> bool:
        snapshot: dict[str, Any] | None
        try:
            snapshot = self.staging.copy(refs)
        except CHECKPOINT_ERRORS as e:
            self.telemetry.failure("snapshot", step, e)
            # Every rank must still take part in the collectives of this save attempt, so a
            # rank whose copy failed joins without a snapshot instead of skipping it.
            snapshot = None
        finally:
            assert self._snapshot_done is not None
            self._snapshot_done.set()
        return self._committed(step, self.commits.write(step, samples_seen, snapshot, t0, notes))

    def _committed(self, step: int, committed: bool) -> bool:
        if committed:
            self.last_committed_step = step
            if self.memory is not None:
                self.memory.committed(step)
            if self.info.is_main:
                # In the background: deletions never delay a commit or the next snapshot.
                self._deleter.submit(self._retention)
        return committed

    def _allocate_staging(self, refs: dict[str, Any]) -> None:
        try:
            self.staging.allocate(refs)
        except CHECKPOINT_ERRORS as e:  # the first save allocates what is missing
            log.warning("checkpoint: could not pre-allocate staging buffers: %s", describe_error(e))

    def _retention(self) -> None:
        ck = self.cfg.checkpoint
        try:
            _, failed = apply_retention(self.catalog, ck.keep_last, ck.keep_every)
            self.telemetry.retention_failures(len(failed))
        except CHECKPOINT_ERRORS as e:
            self.telemetry.failure("retention", None, e)
            failed = [e]
        if failed and self.commits.refusal is None:  # deletes refused for good: stop at the next save
            self.commits.refusal = storage_verdict(self.storage, ck.single_writer, ck.storage_retry_s,
                                                   self.commits.stop_probing)

    def stop_probing(self) -> None:
        """A stop signal arrived: a store that refuses is not probed any longer (signal-safe)."""
        self.commits.stop_probing.set()
