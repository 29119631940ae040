"""Both ends of the memory tier for one worker: leaving the state of the last completed step
in shared memory when the process goes down, and taking it back on the restart.

**Leaving.** The state is consistent at ``train_state.step`` except while an update is being
applied (optimizer step, scaler, LR, EMA, counters): the checkpointer marks that window
(``updating()`` in ``before_update``, ``consistent_at(step)`` once the loop has advanced its
counters), under a lock that a writer holds while it serialises, so the main thread can never
start an update under a writer's feet and no half-applied update is ever saved. In particular
the state is consistent whenever the main thread waits in a collective: in DDP's backward
nothing has been updated yet (state = step S), in the per-step agreement the step is done
(state = S+1, counters advanced). The state is left:

* when the process goes down after a failure (a peer died and a collective raised): the
  checkpointer's ``close()``, on every way out;
* when a stop signal arrives (torchrun SIGTERMs the survivors when one worker dies): from a
  thread woken through ``signal.set_wakeup_fd``, because the main thread may be stuck in a
  collective that will never return (a peer on a lost node), where no Python signal handler
  runs and torchrun's SIGKILL would come next;
* when the local supervisor orders the process out by signal, from the same thread;
* every ``checkpoint.memory_every_steps`` steps, from a background thread, for the case where
  nobody survives to leave it (every process of a node killed at once).

Nothing is written for a step that is already committed (or for step 0).

**Taking back** (``resume``, every rank, on a restart of the same run): each rank finds the
newest snapshot its node holds that this start accepts (``memory_tier.check``), the ranks agree
on the newest step anywhere, and the lowest rank holding it verifies it (CRC-32C, safe decode)
and broadcasts the bytes over the checkpoint group; every rank checks and decodes them again and
loads them into the registry. A file that fails on its holder is removed and the ranks agree
again; if no rank holds a usable snapshot, the caller resumes from the object store.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from service.checkpoint.collectives import CHECKPOINT_ERRORS, describe_error
from service.checkpoint.context import CheckpointContext
from service.checkpoint.errors import MemoryRecoveryError
from service.checkpoint.memory_tier import (
    CORRUPT,
    Expected,
    Header,
    MemoryTier,
    Rejected,
    check_payload,
    decode_payload,
    read_payload,
)

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
MAX_ROUNDS = 6  # agreements after a holder found its file bad (each round removes one file)
PERIODIC_WAIT_S = 60.0  # the longest the next update waits for a due periodic snapshot


class _GiveUp(Exception):
    """The holder of the agreed snapshot could not read it for a reason that another round
    would not change: every rank resumes from the object store."""




class MemoryRecovery:
    def __init__(self, ctx: CheckpointContext, tier: MemoryTier, incarnation: Callable[[], int | None],
                 can_read_state: Callable[[], bool]):
        self.tier, self.info, self.group, self.telemetry = tier, ctx.info, ctx.group, ctx.telemetry
        self.shared_keys = [k for k in ctx.state if k not in ctx.per_rank_keys]
        self.state = ctx.state
        self.fingerprint = ctx.fingerprint
        self._incarnation, self._can_read_state = incarnation, can_read_state
        self._lock = threading.Lock()
        self._consistent: int | None = None  # the step the state is at, None while updating
        self._committed: int | None = None
        self._left: int | None = None
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._then: dict[int, Callable[[], None]] = {}
        # Periodic snapshots (leave_soon): the step due, until the writer has dealt with it.
        self._cond = threading.Condition(self._lock)
        self._pending: int | None = None
        self._due_why = ""
        self._writer: threading.Thread | None = None
        self._closed = False

    # -- the loop's marks ----------------------------------------------------------------------
    def updating(self) -> None:
        """An update is about to change the state: waits while a writer reads it, and for a
        due periodic snapshot to be taken (a writer that has not started yet would otherwise
        find the state changing and skip it)."""
        with self._cond:
            deadline = time.monotonic() + PERIODIC_WAIT_S
            while self._pending is not None and self._pending == self._consistent and not self._closed:
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    log.warning("memory tier: the snapshot of step %d was not taken within %.0fs: "
                                "training goes on without it", self._pending, PERIODIC_WAIT_S)
                    self._pending = None
            self._consistent = None

    def consistent_at(self, step: int) -> None:
        with self._lock:
            self._consistent = step

    def committed(self, step: int | None, run_finished: bool = False) -> None:
        """``step`` is committed in the object store: snapshots up to it are of no more use
        (all of them, once the run has finished)."""
        with self._lock:  # never prunes under a writer, never lets one write a committed step
            if step is not None:
                self._committed = max(step, self._committed or 0)
            if self._committed is None and not run_finished:
                return  # nothing committed: every snapshot may still be needed
            try:
                removed = self.tier.prune(None if run_finished else self._committed)
            except OSError as e:
                log.warning("memory tier: could not remove old snapshots in %s: %s", self.tier.dir, e)
                return
        if removed:
            log.debug("memory tier: removed %d snapshot file(s) up to step %s", removed, step)

    def rolled_back(self, step: int) -> None:
        """The state is back at committed ``step``: every snapshot here is of the diverged run."""
        with self._lock:
            self._committed = step
            try:
                self.tier.prune(None)
            except OSError as e:
                log.warning("memory tier: could not remove snapshots in %s: %s", self.tier.dir, e)
        self.consistent_at(step)

    # -- leaving -----------------------------------------------------------------------------
    def leave_soon(self, why: str) -> None:
        """Leave the last completed step from a background thread (a periodic snapshot:
        ``checkpoint.memory_every_steps``). The writer holds the lock while it serialises, so
        the main thread only waits if the write outlasts the next step's forward and backward
        (its ``updating()`` is the first thing that needs the lock)."""
        if self._closed:
            return
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_when_due, name="memory-tier-periodic", daemon=True)
            self._writer.start()
        with self._cond:
            self._pending, self._due_why = self._consistent, why
            self._cond.notify_all()

    def _write_when_due(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._closed:
                    return
                why = self._due_why
            try:  # leave() takes the lock itself
                self.leave(why, level=logging.DEBUG)
            finally:
                with self._cond:
                    self._pending = None
                    self._cond.notify_all()

    def leave(self, why: str, level: int = logging.WARNING) -> bool:
        """Leave the state of the last completed step in the tier, if it is newer than the
        newest commit and not left already; whether a file was written. Never raises: it runs
        on the way out."""
        with self._lock:
            step = self._consistent
            if step is None or step < 1 or step == self._left or step <= (self._committed or 0):
                return False
            try:
                if not self._can_read_state():
                    return False
                self._sweep()
                t0 = time.monotonic()
                refs = {key: self.state[key].state_dict() for key in self.shared_keys}
                header = Header(run_id=self.tier.run_id, incarnation=self._incarnation(),
                                fingerprint=self.fingerprint, step=step, world_size=self.info.world_size,
                                rank=self.info.rank)
                path = self.tier.write(header, refs)
            except CHECKPOINT_ERRORS as e:
                log.error("memory tier: could not leave step %d (%s): %s", step, why, describe_error(e))
                return False
            self._left = step
        if path is None:
            log.info("memory tier: step %d already left on this node by a peer (%s)", step, why)
        else:
            log.log(level, "memory tier: left step %d in %s (%s, %.3fs)", step, path, why, time.monotonic() - t0)
        return path is not None

    def _sweep(self) -> None:
        """Half-written files of dead writers, and every run's files older than a day."""
        try:
            removed = self.tier.sweep_temporary() + self.tier.sweep_old()
        except OSError as e:
            log.debug("memory tier: sweeping %s: %s", self.tier.dir, e)
            return
        if removed:
            log.info("memory tier: removed %d left-over file(s) from %s", removed, self.tier.dir)

    def watch_signals(self, then: dict[int, Callable[[], None]] | None = None) -> None:
        """Main thread, after the stop signals' Python handlers are installed: a thread that
        leaves the state as soon as one arrives, even while the main thread is blocked. For the
        signals in ``then`` (each with a Python handler too) it leaves the state, then calls
        their action (the worker's exit on a restart order)."""
        if self._wakeup is not None or threading.current_thread() is not threading.main_thread():
            return
        self._then = dict(then or {})
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        try:
            signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        except ValueError as e:  # not the main interpreter / thread: the close() path remains
            log.debug("memory tier: no signal watcher: %s", e)
            reader.close()
            writer.close()
            return
        self._wakeup = (reader, writer)
        threading.Thread(target=self._watch, args=(reader,), name="memory-tier-signals", daemon=True).start()

    def _watch(self, reader: socket.socket) -> None:
        then = {int(s): action for s, action in self._then.items()}
        wanted = {int(s) for s in STOP_SIGNALS} | set(then)
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            arrived = wanted & set(data)
            if arrived:
                self.leave(f"signal {min(arrived)}")
            for sig in sorted(arrived & set(then)):
                then[sig]()

    def stop_watching(self) -> None:
        """No more signals watched nor periodic snapshots taken (the process is on its way out)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()  # a waiting periodic writer wakes up and ends
        if self._wakeup is None:
            return
        if threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(-1)
        reader, writer = self._wakeup
        self._wakeup = None
        writer.close()  # the watcher's recv() returns b"" and the thread ends
        reader.close()

    # -- taking back -------------------------------------------------------------------------
    def resume(self, committed: tuple[int, int | None] | None) -> int | None:
        """Every rank: load the newest snapshot any rank holds, if this start may use it; its
        step, or None (then resume from the object store). ``committed``: the newest commit's
        step and incarnation, or None."""
        expected = Expected(self.tier.run_id, self.fingerprint, self.info.world_size,
                            *(committed if committed is not None else (None, None)))
        self._committed = expected.committed_step
        self._sweep()
        t0 = time.monotonic()
        reported: set[str] = set()
        for _ in range(MAX_ROUNDS):
            mine = self._find(expected, reported)
            offers = self.group.gather_to_all(mine[0].step if mine is not None else None)
            held = {rank: s for rank, s in enumerate(offers) if s is not None}
            if not held:
                return None
            step = max(held.values())
            src = min(rank for rank, s in held.items() if s == step)  # DDP state: one holder is enough
            try:
                payload = self._from_holder(src, mine if self.info.rank == src else None)
            except _GiveUp:
                return None
            if payload is None:
                continue  # the holder's file was bad and is gone: agree again
            decoded = self._decode_everywhere(*payload)
            if decoded is None:
                return None
            self._load(decoded, step, src)
            self.telemetry.recovered_from_memory(step - (expected.committed_step or 0), t0)
            self.consistent_at(step)
            log.info("resumed from memory tier at step %d (held by rank %d; newest commit: %s; %.2fs)",
                     step, src, f"step {expected.committed_step}" if committed else "none",
                     time.monotonic() - t0)
            return step
        log.warning("memory tier: no usable snapshot after %d rounds", MAX_ROUNDS)
        return None

    def _find(self, expected: Expected, reported: set[str]) -> tuple[Header, Any] | None:
        """This node's newest acceptable file; the ones passed over are reported once."""
        try:
            found, rejected = self.tier.find(expected)
        except CHECKPOINT_ERRORS as e:  # whatever it is, this rank must still join the agreement
            log.warning("memory tier: cannot read %s: %s", self.tier.dir, describe_error(e))
            return None
        for path, why in rejected:
            if str(path) in reported:
                continue
            reported.add(str(path))
            self.telemetry.memory_rejected(why.reason)
            log.warning("memory tier: not using %s: %s", path, why)
            if why.reason == CORRUPT:
                self.tier.discard(path)
        return found

    def _from_holder(self, src: int, mine: tuple[Header, Any] | None
                     ) -> tuple[Header, torch.Tensor, dict[str, Any] | None] | None:
        """The agreed snapshot's header and bytes on every rank (and, on the holder, the state
        it decoded): the holder ``src`` reads and checks its file (removing it if bad) and
        broadcasts them; None if it was bad."""
        outcome: tuple[Header, int] | bool | None = None
        data: torch.Tensor | None = None
        decoded: dict[str, Any] | None = None
        if mine is not None:
            header, path = mine
            try:
                data = read_payload(path, header)
                decoded = decode_payload(data)  # a file that no rank could use goes right now
                outcome = (header, header.payload_length)
            except Rejected as e:
                self.telemetry.memory_rejected(e.reason)
                log.warning("memory tier: not using %s: %s", path, e)
                self.tier.discard(path)
            except CHECKPOINT_ERRORS as e:  # e.g. out of memory: the peers still wait for an answer
                log.warning("memory tier: cannot read %s: %s; using the object store", path,
                            describe_error(e))
                outcome = False
        outcome = self.group.broadcast(outcome, src=src)
        if outcome is False:
            raise _GiveUp()
        if outcome is None:
            return None
        assert isinstance(outcome, tuple)
        header, length = outcome
        if self.group.pg is not None:
            if data is None:
                data = torch.empty(length, dtype=torch.uint8)
            dist.broadcast(data, src=src, group=self.group.pg)
        assert data is not None
        return header, data, decoded

    def _decode_everywhere(self, header: Header, data: torch.Tensor,
                           decoded: dict[str, Any] | None) -> dict[str, Any] | None:
        """Check and decode the broadcast bytes on every rank (the holder has already); every
        rank gets the same answer (decoded, or None when any rank failed) before any of them
        touches its registry."""
        problem: str | None = None
        try:
            if decoded is None:
                check_payload(data, header)
                decoded = decode_payload(data)
            if sorted(decoded) != sorted(self.shared_keys):
                raise Rejected(CORRUPT, f"holds {sorted(decoded)}, the registry {sorted(self.shared_keys)}")
        except Rejected as e:
            problem = str(e)
        problems = [p for p in self.group.gather_to_all(problem) if p]
        if problems or decoded is None:
            log.warning("memory tier: the snapshot of step %d does not load everywhere: %s; using "
                        "the object store", header.step, "; ".join(problems))
            return None
        return decoded

    def _load(self, decoded: dict[str, Any], step: int, src: int) -> None:
        problem: str | None = None
        try:
            for key in self.shared_keys:  # registry order, as a DCP load goes
                self.state[key].load_state_dict(decoded[key])
        except CHECKPOINT_ERRORS as e:
            problem = f"rank {self.info.rank}: {describe_error(e)}"
        problems = [p for p in self.group.gather_to_all(problem) if p]
        if problems:
            # The registries may be half-loaded now: no start may go on from here. The snapshot
            # goes, so the next start (torchrun's restart) resumes from the object store.
            self.tier.discard(self.tier.path(step))
            raise MemoryRecoveryError(
                f"loading the memory-tier snapshot of step {step} (from rank {src}) failed: "
                + "; ".join(problems) + "; it was removed, and a restart resumes from the object store")
