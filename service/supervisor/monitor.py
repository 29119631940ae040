"""What the supervisor knows about the workers, and the failures it infers from heartbeats.

Pure bookkeeping with an injectable clock, so the detection rules are unit-tested without
processes. A rank *hangs* when its heartbeats stopped for ``hang_timeout_s``, or when it made
no progress for longer than its phase allows: ``hang_timeout_s`` while training; in a phase
spent on storage (loading, checkpointing, stopping) the larger of ``io_timeout_s`` and three
times the longest such phase seen so far — and there, bytes read or written count as
progress. A slow store is therefore never taken for a hang, while a process that stops (no
heartbeats) or a load that is stuck (no bytes) still is. A rank *restarted* when it reports a
new pid.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from service.heartbeat import IO_PHASES, Heartbeat


@dataclass
class RankState:
    hb: Heartbeat
    last_seen: float
    last_progress: float
    phase_since: float


class JobMonitor:
    def __init__(self, hang_timeout_s: float, clock: Callable[[], float] = time.monotonic,
                 order_ttl_s: float | None = None, io_timeout_s: float | None = None):
        """``order_ttl_s``: how long an exit order stands (default: 3 hang timeouts, at least
        60 s) — long enough for every ordered process to heartbeat once more, short enough
        that an order can never outlive the processes it was meant for."""
        self.hang_timeout_s, self.clock = hang_timeout_s, clock
        self.io_timeout_s = io_timeout_s if io_timeout_s is not None else max(120.0, hang_timeout_s)
        # The longest each storage phase has lasted so far (a measure of this store's speed).
        self.longest_phase_s: dict[str, float] = {}
        # A worker that left with an error no restart can fix (its goodbye heartbeat said so).
        self.refused: Heartbeat | None = None
        self.order_ttl_s = order_ttl_s if order_ttl_s is not None else max(60.0, 3 * hang_timeout_s)
        self.ranks: dict[int, RankState] = {}
        self.last_committed_step: int | None = None
        self._lock = threading.Lock()
        # When a worker last reported, or a restart was last ordered: how long the job has
        # been silent (a silent job has no ranks for hang detection to watch).
        self._last_activity = clock()
        # Exit orders, per process (node, pid, start time) -> when the order expires. Keyed by
        # the whole identity: pids repeat across pods and container restarts.
        self._doomed: dict[tuple[str, int, float], float] = {}
        # Stuck processes (cannot act on an order) per node -> expiry; their peers end them.
        self._stuck: dict[tuple[str, int, float], float] = {}
        self.generation = 0

    def observe(self, hb: Heartbeat) -> bool:
        """Record a heartbeat; True if it reveals a restarted worker (new pid for a rank)."""
        now = self.clock()
        with self._lock:
            self._expire(now)
            if hb.process in self._doomed:
                return False  # a process told to exit; its replacement will report soon
            self._last_activity = now
            if hb.phase == "refused":  # left with an error no restart can fix
                self.refused = hb
                self.ranks.pop(hb.rank, None)
                return False
            if hb.phase == "done":  # finished and leaving: silence from now on is expected
                self.ranks.pop(hb.rank, None)
                if hb.last_committed_step is not None:
                    self.last_committed_step = max(self.last_committed_step or 0, hb.last_committed_step)
                return False
            old = self.ranks.get(hb.rank)
            restarted = old is not None and old.hb.pid != hb.pid
            progressed = (old is None or restarted
                          or (hb.step, hb.phase, hb.io_bytes) != (old.hb.step, old.hb.phase, old.hb.io_bytes))
            same_phase = old is not None and not restarted and old.hb.phase == hb.phase
            if old is not None and not same_phase and old.hb.phase in IO_PHASES:
                took = now - old.phase_since
                self.longest_phase_s[old.hb.phase] = max(self.longest_phase_s.get(old.hb.phase, 0.0), took)
            self.ranks[hb.rank] = RankState(
                hb, now, now if progressed else old.last_progress,  # type: ignore[union-attr]
                old.phase_since if same_phase else now,  # type: ignore[union-attr]
            )
            if hb.last_committed_step is not None:
                self.last_committed_step = max(self.last_committed_step or 0, hb.last_committed_step)
            # A world-size change leaves ranks beyond the new size behind: forget them.
            for rank in [r for r in self.ranks if r >= hb.world_size]:
                del self.ranks[rank]
            return restarted

    def hung(self) -> list[RankState]:
        """Ranks without heartbeats for the hang timeout, or without progress for longer than
        their phase allows (``stall_limit``)."""
        now = self.clock()
        with self._lock:
            return [
                s for s in self.ranks.values()
                if s.hb.process not in self._doomed
                and (now - s.last_seen > self.hang_timeout_s
                     or now - s.last_progress > self.stall_limit(s.hb.phase))
            ]

    def stall_limit(self, phase: str) -> float:
        """How long a rank in ``phase`` may go without progress."""
        if phase not in IO_PHASES:
            return self.hang_timeout_s
        return max(self.hang_timeout_s, self.io_timeout_s, 3 * self.longest_phase_s.get(phase, 0.0))

    def forget(self, rank: int) -> RankState | None:
        """Drop a rank whose process is known to be gone (its replacement reports afresh)."""
        with self._lock:
            return self.ranks.pop(rank, None)

    def silent_nodes(self, silence_s: float) -> set[str]:
        """Nodes whose every rank has sent no heartbeat for ``silence_s``, in a job of several
        nodes (attach mode cannot see processes; this is how a lost node or a cut link looks
        from here — and also a node whose only worker is SIGSTOPped)."""
        now = self.clock()
        with self._lock:
            nodes: dict[str, list[bool]] = {}
            for s in self.ranks.values():
                nodes.setdefault(s.hb.node, []).append(now - s.last_seen > silence_s)
            if len(nodes) < 2:
                return set()
            return {node for node, silent in nodes.items() if all(silent)}

    def heartbeat_ages(self) -> dict[int, float]:
        now = self.clock()
        with self._lock:
            return {r: now - s.last_seen for r, s in self.ranks.items()}

    def order_restart(self, stuck: list[RankState] | None = None) -> list[RankState]:
        """Mark every known worker process for exit (answered on its next heartbeat) and
        forget the ranks: the next heartbeats come from the restarted processes.

        ``stuck`` processes cannot act on an order (SIGSTOPped, wedged); their peers on the same
        node are asked to SIGKILL them on the way out (see ``kill_list``).
        """
        with self._lock:
            doomed = list(self.ranks.values())
            expires = self.clock() + self.order_ttl_s
            self._doomed.update({s.hb.process: expires for s in doomed})
            self._stuck.update({s.hb.process: expires for s in stuck or []})
            self.ranks.clear()
            self.generation += 1
            self._last_activity = self.clock()
            return doomed

    def silent_for(self) -> float:
        """Seconds since a worker last reported or a restart was last ordered."""
        with self._lock:
            return self.clock() - self._last_activity

    def should_exit(self, hb: Heartbeat) -> bool:
        """Whether this very process (node, pid, start time) was ordered to exit."""
        with self._lock:
            self._expire(self.clock())
            return hb.process in self._doomed

    def kill_list(self, hb: Heartbeat) -> list[int]:
        """Pids of stuck processes on ``hb``'s node that the exiting process should end."""
        with self._lock:
            self._expire(self.clock())
            return sorted({p[1] for p in self._stuck if p[0] == hb.node and p != hb.process})

    def _expire(self, now: float) -> None:
        """Drop orders past their time (lock held)."""
        for orders in (self._doomed, self._stuck):
            for process in [p for p, until in orders.items() if until <= now]:
                del orders[process]

    def world_size(self) -> int:
        with self._lock:
            return max((s.hb.world_size for s in self.ranks.values()), default=0)

    def all_fresh(self, world_size: int) -> bool:
        """Every rank of the job has reported within the hang timeout (readiness)."""
        now = self.clock()
        with self._lock:
            return (
                world_size > 0 and len(self.ranks) >= world_size
                and all(now - s.last_seen <= self.hang_timeout_s for s in self.ranks.values())
            )
