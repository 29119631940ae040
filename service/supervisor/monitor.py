"""What the supervisor knows about the workers, and the failures it infers from heartbeats.

Pure bookkeeping with an injectable clock, so the detection rules are unit-tested without
processes. A rank *hangs* when its heartbeats stopped for ``hang_timeout_s``, or when it made
no progress for longer than its phase allows: ``hang_timeout_s`` while training; in a phase
spent on storage (loading, checkpointing, stopping) the larger of ``io_timeout_s`` and three
times the longest such phase seen so far — and there, bytes read or written count as
progress. While a rank is in such a phase and within its limit, its peers get that limit too:
in a synchronous job they wait for it in their next collective, and their own time without
progress counts from when the last peer left storage (they still need a step to catch up). A
slow store is therefore
never taken for a hang, while a process that stops (no heartbeats) or a load that is stuck (no
bytes) still is. A process's first training step (torch.compile, autotuning, the first
collectives) may take ``first_step_timeout_s`` (supervisor.startup_timeout_s). Neither extension holds while a rank of the reported world has been missing
(never reported) for a hang timeout: its peers wait for it, not for storage.

A rank *restarted* when another process (node, pid, start time) reports for it. torchrun
restarts every worker of the job after one crash, so the replacements of one generation are one
restart event, counted once: a rank whose previous process was already known when the event
began belongs to it; only a replacement of a process that started since is a new event. A
replacement for a larger world is no failure at all (the job grew: torchrun restarts every
worker for the new membership). The job is *finished* once every rank of its world said goodbye
(phase "done") and none reports any more.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from service.heartbeat import IO_PHASES, REFUSED, REFUSED_DIVERGED, REFUSED_STORAGE, Heartbeat

# A rank that sent no heartbeat for this many intervals is silent (stopped or wedged); one that
# heartbeats without progress is only waiting (most often on a silent peer, in a collective).
SILENT_HEARTBEATS = 3


@dataclass
class RankState:
    hb: Heartbeat
    last_seen: float
    last_progress: float
    phase_since: float
    trained_at: float | None = None
    """When this process last reported a higher step while training (None: not yet)."""

    def describe(self, now: float) -> str:
        """Who it is and what it was doing, for an operator reading a hang report."""
        hb = self.hb
        return (f"rank {hb.rank} (node {hb.node}, pid {hb.pid}, step {hb.step}, {hb.phase} for "
                f"{now - self.phase_since:.0f}s, no progress for {now - self.last_progress:.0f}s)")


class JobMonitor:
    def __init__(self, hang_timeout_s: float, clock: Callable[[], float] = time.monotonic,
                 order_ttl_s: float | None = None, io_timeout_s: float | None = None,
                 restart_window_s: float | None = None, heartbeat_interval_s: float = 1.0,
                 first_step_timeout_s: float | None = None):
        """``order_ttl_s``: how long an exit order stands (default: 3 hang timeouts, at least
        60 s) — long enough for every ordered process to heartbeat once more, short enough
        that an order can never outlive the processes it was meant for. ``restart_window_s``:
        how long after a restart event began a replaced process of the generation it ended
        still belongs to it (default: ``order_ttl_s``). ``first_step_timeout_s``: a process's
        first training step's limit (compile, autotuning; default: the hang timeout)."""
        self.hang_timeout_s, self.clock = hang_timeout_s, clock
        self.first_step_timeout_s = max(hang_timeout_s, first_step_timeout_s or 0.0)
        self.io_timeout_s = io_timeout_s if io_timeout_s is not None else max(120.0, hang_timeout_s)
        # The longest each storage phase has lasted so far (a measure of this store's speed).
        self.longest_phase_s: dict[str, float] = {}
        # rank -> when it was last seen on storage within its limit: until then it held its
        # peers up (they wait in their next collective), so their no-progress clock starts there.
        self._on_storage_at: dict[int, float] = {}
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
        self._ordered_at: dict[tuple[str, int, float], float] = {}  # when each was ordered out
        self.heartbeat_interval_s = heartbeat_interval_s
        # Stuck processes (cannot act on an order) per node -> expiry; their peers end them.
        self._stuck: dict[tuple[str, int, float], float] = {}
        self.generation = 0
        # The current restart event: the processes known when it began (each one's replacement
        # belongs to it) and until when.
        self.restart_window_s = restart_window_s if restart_window_s is not None else self.order_ttl_s
        self._replaced: set[tuple[str, int, float]] = set()
        self._replaced_until = 0.0
        # Ranks that said goodbye (phase "done") -> the world size they reported.
        self._done: dict[int, int] = {}
        # Nodes declared lost -> (when, their processes then); one whose processes report again
        # unchanged was cut off, not gone: (node, seconds unreachable) in ``reconnected``.
        self._lost: dict[str, tuple[float, set[tuple[str, int, float]], set[str]]] = {}
        self.reconnected: list[tuple[str, float]] = []
        self._absent_since: float | None = None  # since when a rank of the world is missing
        self.absent_ranks: list[int] = []

    def observe(self, hb: Heartbeat) -> bool:
        """Record a heartbeat; True if it reveals a new restart event (another process for a
        rank, which no restart event counted so far explains)."""
        now = self.clock()
        with self._lock:
            self._expire(now)
            self._note_reachable(hb, now)
            if hb.process in self._doomed:
                return False  # a process told to exit; its replacement will report soon
            self._last_activity = now
            if hb.phase in (REFUSED, REFUSED_STORAGE, REFUSED_DIVERGED):  # left with an error no restart can fix
                self.refused = hb
                self.ranks.pop(hb.rank, None)
                return False
            if hb.phase == "done":  # finished and leaving: silence from now on is expected
                self.ranks.pop(hb.rank, None)
                self._done[hb.rank] = hb.world_size
                if hb.last_committed_step is not None:
                    self.last_committed_step = max(self.last_committed_step or 0, hb.last_committed_step)
                return False
            for rank in [r for r, w in self._done.items() if r == hb.rank or w != hb.world_size]:
                del self._done[rank]  # reporting again (a new job, or a new membership)
            old = self.ranks.get(hb.rank)
            # The whole identity: pids repeat across pods, and a replaced pod's worker may well
            # get the same pid in its fresh PID namespace.
            replaced = old is not None and old.hb.process != hb.process
            restarted = replaced and self._new_restart_event(old, hb, now)  # type: ignore[arg-type]
            progressed = (old is None or replaced
                          or (hb.step, hb.phase, hb.io_bytes) != (old.hb.step, old.hb.phase, old.hb.io_bytes))
            same_phase = old is not None and not replaced and old.hb.phase == hb.phase
            if old is not None and not same_phase and old.hb.phase in IO_PHASES:
                self._on_storage_at[hb.rank] = now  # on storage until this heartbeat
                took = now - old.phase_since
                self.longest_phase_s[old.hb.phase] = max(self.longest_phase_s.get(old.hb.phase, 0.0), took)
            trained_at = None
            if old is not None and not replaced:  # steps grew in one process, past its start-up
                trained = hb.step > old.hb.step and old.hb.phase not in ("starting", "loading")
                trained_at = now if trained else old.trained_at
            self.ranks[hb.rank] = RankState(
                hb, now, now if progressed else old.last_progress,  # type: ignore[union-attr]
                old.phase_since if same_phase else now,  # type: ignore[union-attr]
                trained_at,
            )
            if hb.last_committed_step is not None:
                self.last_committed_step = max(self.last_committed_step or 0, hb.last_committed_step)
            # A world-size change leaves ranks beyond the new size behind: forget them (and any
            # rank no world has, should one ever get past the heartbeat's validation).
            for rank in [r for r in self.ranks if not 0 <= r < hb.world_size]:
                del self.ranks[rank]
            return restarted

    def _new_restart_event(self, old: RankState, hb: Heartbeat, now: float) -> bool:
        """``hb`` comes from a new process for ``old``'s rank: whether that begins a restart
        event (lock held)."""
        if hb.world_size > old.hb.world_size:
            return False  # the job grew: a new membership, no failure
        if old.hb.process in self._replaced and now < self._replaced_until:
            return False  # one more replacement of the generation an event already counted
        self._replaced = {s.hb.process for s in self.ranks.values()}
        self._replaced_until = now + self.restart_window_s
        return True

    def finished(self) -> bool:
        """Every rank of the job's world said goodbye (phase "done"), and none reports now."""
        with self._lock:
            if self.ranks or not self._done:
                return False
            world = max(self._done.values())
            return all(rank in self._done for rank in range(world))

    def progress_mark(self) -> tuple[float, int | None]:
        """Now, for ``progressed_since``."""
        with self._lock:
            return self.clock(), self.last_committed_step

    def progressed_since(self, mark: tuple[float, int | None]) -> bool:
        """Whether the job made progress since ``mark``: a new commit, or a process whose
        training steps advanced."""
        at, committed = mark
        with self._lock:
            if self.last_committed_step != committed:
                return True
            return any(s.trained_at is not None and s.trained_at > at for s in self.ranks.values())

    def hung(self) -> list[RankState]:
        """Ranks without heartbeats for the hang timeout, or without progress for longer than
        their phase allows (``stall_limit``)."""
        now = self.clock()
        with self._lock:
            on_storage = {s.hb.rank: self.stall_limit(s.hb.phase) for s in self.ranks.values()
                          if s.hb.phase in IO_PHASES and now - s.last_seen <= self.hang_timeout_s
                          and now - s.last_progress <= self.stall_limit(s.hb.phase)}
            for rank in on_storage:
                self._on_storage_at[rank] = now
            for rank in [r for r in self._on_storage_at if r not in self.ranks]:
                del self._on_storage_at[rank]

            # A rank of the world that never reported (stopped or wedged before its first heartbeat)
            # holds the others up, whatever their phase: after a hang timeout, no limit is extended.
            absent = self._absent_for(now) > self.hang_timeout_s

            def limit(s: RankState) -> float:  # a peer's storage work holds this rank up too
                if absent:
                    return self.hang_timeout_s
                peers = [lim for rank, lim in on_storage.items() if rank != s.hb.rank]
                first = self.first_step_timeout_s if s.hb.phase == "training" and s.trained_at is None else 0.0
                return max([self.stall_limit(s.hb.phase), first, *peers])

            def stalled_s(s: RankState) -> float:  # since its last progress, or a peer's storage work
                held = [] if absent else [t for rank, t in self._on_storage_at.items() if rank != s.hb.rank]
                return now - max([s.last_progress, *held])

            return [
                s for s in self.ranks.values()
                if s.hb.process not in self._doomed
                and (now - s.last_seen > self.hang_timeout_s or stalled_s(s) > limit(s))
            ]

    def _absent_for(self, now: float) -> float:
        """How long some rank of the reported world has been missing: never reported, nor said
        goodbye (lock held; 0 when none is). Those ranks: ``absent_ranks``."""
        world = max((s.hb.world_size for s in self.ranks.values()), default=0)
        self.absent_ranks = [r for r in range(world) if r not in self.ranks and r not in self._done]
        if not self.absent_ranks:
            self._absent_since = None
        elif self._absent_since is None:
            self._absent_since = now
        return 0.0 if self._absent_since is None else now - self._absent_since

    @property
    def silence_s(self) -> float:
        """How long without a heartbeat makes a process *silent*: ``SILENT_HEARTBEATS``
        intervals, and at most half the hang timeout (a stopped process is silent by the time
        its hang is detected, whatever the interval)."""
        return min(SILENT_HEARTBEATS * self.heartbeat_interval_s, self.hang_timeout_s / 2)

    def states(self) -> list[RankState]:
        with self._lock:
            return list(self.ranks.values())

    def silent_among(self, states: list[RankState], silence_s: float) -> list[RankState]:
        """The processes among ``states`` that sent no heartbeat for ``silence_s``: stopped or
        wedged, unable to act on an order. The others are alive, if without progress."""
        now = self.clock()
        return [s for s in states if now - s.last_seen > silence_s]

    def ordered_before(self, seconds: float) -> list[tuple[str, int, float]]:
        """Processes ordered to exit at least ``seconds`` ago whose order still stands."""
        with self._lock:
            horizon = self.clock() - seconds
            return [p for p, at in self._ordered_at.items() if at <= horizon and p in self._doomed]

    def drop_order(self, process: tuple[str, int, float]) -> None:
        with self._lock:
            self._ordered_at.pop(process, None)

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

    def reachable(self, hb: Heartbeat) -> None:
        """A heartbeat that is not observed (its process was ordered out) still shows that its
        node is reachable."""
        with self._lock:
            self._note_reachable(hb, self.clock())

    def _note_reachable(self, hb: Heartbeat, now: float) -> None:
        lost = self._lost.get(hb.node)
        # Reachable again: the same process, or a replacement the node's own torchrun agent
        # started (the agent lived on; a new node's agent is another process).
        if lost is not None and (hb.process in lost[1] or (hb.agent and hb.agent in lost[2])):
            del self._lost[hb.node]
            self.reconnected.append((hb.node, now - lost[0]))

    def nodes_lost(self, nodes: set[str]) -> None:
        """``nodes`` were declared lost (every rank silent): remember their processes, to tell
        a partition (the same processes, or their own agent's replacements, report again) from
        a node that is gone."""
        with self._lock:
            for node in nodes:
                states = [s for s in self.ranks.values() if s.hb.node == node]
                if states:  # unreachable since its last heartbeat
                    self._lost[node] = (max(s.last_seen for s in states), {s.hb.process for s in states},
                                        {s.hb.agent for s in states if s.hb.agent})

    def relative_speeds(self) -> dict[int, tuple[str, float]]:
        """rank -> (node, its speed relative to the fastest rank: the fastest one's compute
        time per step over its own; 1.0 is the fastest), for ranks that measured one."""
        with self._lock:
            times = {r: (s.hb.node, s.hb.compute_s) for r, s in self.ranks.items() if s.hb.compute_s > 0}
        if not times:
            return {}
        fastest = min(t for _, t in times.values())
        return {r: (node, fastest / t) for r, (node, t) in times.items()}

    def step_times(self) -> dict[int, tuple[str, float, float]]:
        """rank -> (node, compute seconds per step, gradient communication seconds per step)
        as the rank last reported them, for ranks that measured a step."""
        with self._lock:
            return {r: (s.hb.node, s.hb.compute_s, s.hb.comm_s) for r, s in self.ranks.items() if s.hb.compute_s > 0}

    def suspect_nodes(self) -> set[str]:
        """Nodes the ranks' replica checks found holding a copy the majority disagrees with."""
        with self._lock:
            return {node for s in self.ranks.values() for node in s.hb.suspect_nodes}

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
            self._ordered_at.update({s.hb.process: self.clock() for s in doomed})
            self._stuck.update({s.hb.process: expires for s in stuck or []})
            self.ranks.clear()
            self._done.clear()
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
        """Pids of stuck processes on ``hb``'s node that the exiting process should end (never
        0, 1 or a negative pid: a process group, init, or every process of the user)."""
        return sorted({pid for pid, started in self.stuck_on(hb.node) if (hb.node, pid, started) != hb.process})

    def stuck_on(self, node: str) -> list[tuple[int, float]]:
        """(pid, start time) of the stuck processes on ``node`` whose order still stands: what
        that node's torchrun agent (their ancestor) ends when it asks (``POST /stuck``) — the
        one process left to do it when every worker of the node is stuck. The start time tells
        the process from a later one that got the same pid."""
        with self._lock:
            self._expire(self.clock())
            return sorted({(p[1], p[2]) for p in self._stuck if p[0] == node and p[1] > 1})

    def _expire(self, now: float) -> None:
        """Drop orders past their time (lock held)."""
        for orders in (self._doomed, self._stuck):
            for process in [p for p, until in orders.items() if until <= now]:
                del orders[process]
        for process in [p for p in self._ordered_at if p not in self._doomed]:
            del self._ordered_at[process]

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
