"""What a restart cost, measured by the workers: the seconds from the job's last completed step
before a fault to the first step completed after it, and the completed steps it had to train
again (``ftdiff_recovery_seconds``, ``ftdiff_steps_lost_total``, served by the supervisor).

Every rank keeps a tiny record of its progress in the node's memory-tier folder (``/dev/shm``):
the last step it completed, when, and why it left if it left on purpose (ordered out by the
supervisor because a peer hung, or stopped by a signal after an emergency commit). It is one
24-byte ``pwrite`` per step into a file in RAM, so a process that dies by SIGKILL still leaves
the step it last completed. A restart of the same run reads its node's records, the ranks agree
on the newest step and time anywhere, and rank 0 reports, once its first step is done:

* ``seconds`` = now - the newest record's time (wall clocks; across nodes they differ by
  whatever NTP leaves, a few ms);
* ``steps_lost`` = newest recorded step - the step resumed from (0 when the memory tier held
  the survivors' step; up to ``checkpoint.every_steps`` from the object store);
* ``kind``: ``hang`` if a process was ordered out, ``preemption`` if every record says its
  process stopped after committing, ``rescale`` if the world grew (a node joined: torchrun
  restarts every worker), else ``crash``; ``source``: where the state came from.

A first start (no records of its run on any node) reports nothing. The records are removed when
the run finishes and, like every file of the tier, swept after a day.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import crc32c

from service.checkpoint.memory_tier import run_key
from service.heartbeat import Recovery
from service.vocabulary import RecoveryKind

log = logging.getLogger(__name__)

ORDERED, STOPPED = 1, 2  # why a process left: flags of its record
_RECORD = struct.Struct("<qdII")  # step, unix time, flags, world size; then their CRC-32C
_CRC = struct.Struct("<I")
SIZE = _RECORD.size + _CRC.size


@dataclass(frozen=True)
class LastStep:
    """The newest progress of a job: its last completed step, when, and how processes left."""

    step: int
    time: float
    ordered: bool = False
    all_stopped: bool = False
    world_size: int = 0
    """The world the records were written in (the largest, if they differ)."""

    def kind(self, world_size: int) -> RecoveryKind:
        """What the restart into ``world_size`` ranks recovered from (the supervisor may know
        better: service.supervisor.failure_cost relabels by its own diagnosis)."""
        # torchrun stops every worker (SIGTERM: an emergency commit) when a node joins: a larger
        # world is a rescale whatever the records say. A lost node's restart is a crash.
        if self.world_size and world_size > self.world_size:
            return RecoveryKind.RESCALE
        if self.ordered:
            return RecoveryKind.HANG
        return RecoveryKind.PREEMPTION if self.all_stopped else RecoveryKind.CRASH


def combine(found: list[LastStep | None]) -> LastStep | None:
    """The job's newest progress from every rank's view of its node (None: a first start)."""
    known = [p for p in found if p is not None]
    if not known:
        return None
    return LastStep(step=max(p.step for p in known), time=max(p.time for p in known),
                    ordered=any(p.ordered for p in known), all_stopped=all(p.all_stopped for p in known),
                    world_size=max(p.world_size for p in known))


class StepRecord:
    """This rank's record, and the node's records of the run, in the memory-tier folder."""

    def __init__(self, directory: Path, run_id: str, rank: int, world_size: int = 0):
        self.dir = directory
        self.prefix = f"ftdiff-{run_key(run_id)}-progress-"
        self.path = directory / f"{self.prefix}{rank:06d}.mem"
        self.world_size = world_size
        self._fd: int | None = None
        self._step: int | None = None
        self._time = 0.0
        self._flags = 0
        self._refused = False

    def mark(self, step: int) -> None:
        """``step`` is completed (every rank, after each step). Never raises: bookkeeping."""
        self._step, self._time = step, time.time()
        self._write()

    def left(self, flag: int) -> None:
        """This process leaves on purpose (``ORDERED`` or ``STOPPED``); any thread."""
        self._flags |= flag
        if self._step is not None:
            self._write()

    def _write(self) -> None:
        if self._refused:
            return
        try:
            if self._fd is None:
                os.makedirs(self.dir, mode=0o700, exist_ok=True)
                if not _private(self.dir):
                    self._refused = True
                    log.warning("progress records: %s is not private to this user; recovery metrics are "
                                "not recorded", self.dir)
                    return
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
                if not _own_regular_file(self._fd):
                    self.close()
                    return
            body = _RECORD.pack(self._step, self._time, self._flags, self.world_size)
            os.pwrite(self._fd, body + _CRC.pack(crc32c.crc32c(body)), 0)
        except OSError as e:  # the metric is lost, never the training
            log.debug("progress record %s: %s", self.path, e)

    def read_node(self) -> LastStep | None:
        """The newest progress any record of this run on this node holds (torn ones skipped)."""
        records = []
        if not _private(self.dir):  # whoever can write the folder could plant records
            return None
        for path in self._node_paths():
            try:  # never blocks (a FIFO planted under the name) and never follows a link
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                data = os.read(fd, SIZE + 1) if _own_regular_file(fd) else b""
            except OSError:
                continue
            finally:
                os.close(fd)
            if len(data) != SIZE or _CRC.unpack(data[_RECORD.size:])[0] != crc32c.crc32c(data[:_RECORD.size]):
                continue
            step, when, flags, world = _RECORD.unpack(data[:_RECORD.size])
            if step >= 0 and math.isfinite(when):
                records.append(LastStep(step, when, bool(flags & ORDERED), bool(flags & STOPPED), world))
        return combine(records)  # type: ignore[arg-type]

    def clear_node(self) -> None:
        """Remove every record of the run here (local rank 0, once all ranks have read them:
        a rank that is gone since must not haunt the next restart's numbers)."""
        self.close()
        if not _private(self.dir):
            return
        for path in self._node_paths():
            try:
                path.unlink()
            except OSError:
                pass

    def remove(self) -> None:
        """The run finished: this rank's record goes."""
        self.close()
        try:
            self.path.unlink()
        except OSError:
            pass

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _node_paths(self) -> list[Path]:
        """This run's record files here (names only; each is checked when opened)."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return []
        return [self.dir / n for n in names if n.startswith(self.prefix) and n.endswith(".mem")]


class RestartCostMeter:
    """The trainer's side: mark each completed step, and after a restart's resume, report what
    the restart cost once the first step is done (rank 0; ``report`` goes into heartbeats)."""

    def __init__(self, record: StepRecord | None, rank: int, local_rank: int,
                 gather: Callable[[object], list[object]]):
        self.record, self.rank, self.local_rank, self.gather = record, rank, local_rank, gather
        self.report: Recovery | None = None
        self._pending: tuple[LastStep, int, str] | None = None

    def resumed(self, step: int, source: str, restart: bool) -> None:
        """Every rank, after the resume (a collective when ``restart``): what the job had done
        before, if this is a restart of a run that left records. A first start (a run id used
        again for a new root, say) reports nothing; it only clears what an earlier run left."""
        if self.record is None:
            return
        if not restart:
            if self.local_rank == 0:
                self.record.clear_node()
            return
        mine = self.record.read_node()
        views = self.gather(None if mine is None else
                            (mine.step, mine.time, mine.ordered, mine.all_stopped, mine.world_size))
        newest = combine([None if v is None else LastStep(*v) for v in views])  # type: ignore[misc]
        if self.local_rank == 0:  # every rank of the node has read them (the gather)
            self.record.clear_node()
        if newest is not None:
            self._pending = (newest, step, source)

    def step_done(self, step: int) -> None:
        if self.record is None:
            return
        self.record.mark(step)
        if self._pending is None:
            return
        newest, resumed, source = self._pending
        self._pending = None
        if self.rank != 0:
            return
        kind = newest.kind(self.record.world_size)
        now = time.time()
        self.report = Recovery(kind, source, max(0.0, now - newest.time), max(0, newest.step - resumed), now)
        log.info("recovered from a %s: %.2fs from the last step before it (step %d) to step %d done; "
                 "%d completed step(s) trained again; state from %s", self.report.kind,
                 self.report.seconds, newest.step, step, self.report.steps_lost, source)

    def left(self, flag: int) -> None:
        if self.record is not None:
            self.record.left(flag)

    def finished(self) -> None:
        if self.record is not None:
            self.record.remove()


def _private(directory: Path) -> bool:
    """This user's folder, writable by no one else (as the memory tier requires of it)."""
    try:
        st = os.stat(directory)
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _own_regular_file(fd: int) -> bool:
    st = os.fstat(fd)
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()
