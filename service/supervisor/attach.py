"""``ftdiff supervise``: watch a job launched by Kubernetes, Slurm or by hand with torchrun.

It launches nothing. Workers started with ``supervisor.url`` (and the shared token) send it
heartbeats. Restarts are ordered *through the workers*: on a hang, every worker process known
at that moment is answered ``exit`` on its next heartbeat and leaves with code 44 — from its
heartbeat thread, so a worker stuck in a collective gets out too — and its torchrun agent
restarts the group, which reloads the latest committed checkpoint. A process that cannot
heartbeat (SIGSTOPped) is ended by a peer on its node on that peer's way out, or by its node's
agent when that runs as ``python -m service.node.agent`` (it asks ``POST /stuck``; the only
way out when every worker of a node is stuck). On SIGTERM the
supervisor simply leaves: the job trains on, and a restarted supervisor picks it up from the
next heartbeats (exit orders name one process — node, pid, start time — and expire).
"""

from __future__ import annotations

import logging
from typing import Any

from service.config import Config
from service.errors import EXIT_OK, UserError
from service.heartbeat import Heartbeat, shared_token
from service.launch_env import LaunchEnv
from service.supervisor.core import Supervisor
from service.supervisor.monitor import RankState
from service.vocabulary import FailureKind, RestartReason

log = logging.getLogger(__name__)


class AttachedSupervisor(Supervisor):
    """States: "running"; "failed" while it will not act (it gave up, or a worker refused)
    until the job makes progress again (a new commit, or training steps advancing); and
    "succeeded" once every rank of the job said goodbye, until workers report again."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Set while failed: when it began (the job's progress since then ends it).
        self._failed_mark: tuple[float, int | None] | None = None
        self._finished = False

    def start(self) -> None:
        log.info("supervising (attach mode) on %s:%d, metrics on %s", self.cfg.supervisor.host,
                 self.server.port, self.endpoints.metrics_address)

    def _gave_up(self) -> bool:
        """Past max_restarts failures without a new commit, stop ordering restarts (the
        JobCrashLooping alert and the state say so); a person has to look."""
        return self.ledger.failures_since_commit > self.cfg.supervisor.max_restarts

    def _fail(self, why: str) -> None:
        """State "failed": said once, loudly, when it begins."""
        if self._failed_mark is None:
            log.error("%s; state failed until the job makes progress again (a new commit, or "
                      "training steps advancing)", why)
            self._failed_mark = self.monitor.progress_mark()
        self.metrics.state.state("failed")

    def on_hung(self, hung: list[RankState]) -> None:
        desc = ", ".join(f"rank {s.hb.rank} (node {s.hb.node}, step {s.hb.step})" for s in hung)
        if self.refused_by is not None:
            who = self.refused_by
            self._fail(f"no progress on {desc}, but not ordering a restart: rank {who.rank} (node "
                       f"{who.node}) refused to go on, and a restart would only repeat that")
            return
        if self._gave_up():
            self._fail(f"giving up: {self.ledger.failures_since_commit} failures without a new commit "
                       f"(supervisor.max_restarts = {self.cfg.supervisor.max_restarts}); not ordering a "
                       f"restart for {desc}; a person has to look")
            return
        # A node whose ranks all stopped reporting (for more than two intervals) is gone;
        # ranks that report but make no progress are hung.
        lost = self.monitor.silent_nodes(2 * self.cfg.supervisor.heartbeat_interval_s)
        if lost:  # every rank of a node went quiet at once: the node (or its link) is gone
            log.error("lost node(s) %s (%s): ordering a restart through the workers", sorted(lost), desc)
            self.monitor.nodes_lost(lost)
            self.record(FailureKind.LOST_NODE, RestartReason.LOST_NODE)
        else:
            log.error("hang detected on %s: ordering a restart through the workers", desc)
            self.record(FailureKind.HANG, RestartReason.HANG)
        # Only silent processes are ended by their node's peers; one that still heartbeats
        # leaves on its order, and leaves the last completed step in the memory tier first.
        silent = self.monitor.silent_among(self.monitor.states(), self.monitor.silence_s)
        self.monitor.order_restart(stuck=silent)

    def on_refused(self, hb: Heartbeat) -> int | None:
        self._failed_mark = None  # progress counts from this refusal on
        self._fail(f"rank {hb.rank} (node {hb.node}) refused to go on")
        return None  # a Deployment: it stays, reporting the failure until a person acts

    def after_tick(self) -> None:
        if self.exclusion.enabled:  # supervisor.exclude_*: said, for whoever launches the job
            self.exclusion.report(self.exclusion.due(self.monitor.suspect_nodes(), self.monitor.relative_speeds()))
        while self.monitor.reconnected:
            node, gap = self.monitor.reconnected.pop(0)
            log.warning("node %s reports again %.0fs after it went silent, its processes (or its torchrun agent) "
                        "alive all along: a network partition or outage cut it off, the node was not lost", node, gap)
        if self._failed_mark is not None and self.monitor.progressed_since(self._failed_mark):
            log.warning("the job makes progress again (last committed step %s): state running, "
                        "watching for hangs", self.monitor.last_committed_step)
            self._failed_mark, self.refused_by = None, None
        finished = self.monitor.finished()
        if finished != self._finished:
            if finished:
                log.info("every rank of the job finished (last committed step %s)",
                         self.monitor.last_committed_step)
            else:
                log.info("workers report again: a new job")
                self.failure_costs.reset()  # its steps start again: goodput is measured afresh
        self._finished = finished
        self.metrics.state.state("failed" if self._failed_mark else "succeeded" if finished else "running")

    def stop(self) -> int:
        """Leave; the job trains on. The supervisor is a watchdog beside the job, and it gets
        rolled, drained and rescheduled like any Deployment: its SIGTERM says nothing about the
        workers (the cluster sends them their own on preemption). A new supervisor rebuilds its
        view from the next heartbeats."""
        log.warning("signal %d: leaving; the job trains on without a watchdog until a supervisor "
                    "is back", self.stop_signal)
        return EXIT_OK


def run_attached(cfg: Config, launch: LaunchEnv) -> int:
    token = shared_token(cfg.supervisor.token, launch)
    if not token:
        raise UserError("ftdiff supervise needs a shared token: set supervisor.token or FTDIFF_TOKEN")
    try:
        supervisor = AttachedSupervisor(cfg, token)
    except OSError as e:
        sup, met = cfg.supervisor, cfg.metrics
        raise UserError(f"cannot listen on supervisor {sup.host}:{sup.port} or metrics {met.host}:{met.port} "
                        f"({e}): is another supervisor running there? Set supervisor.port / metrics.port") from None
    return supervisor.run()
