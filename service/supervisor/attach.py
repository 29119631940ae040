"""``ftdiff supervise``: watch a job launched by Kubernetes, Slurm or by hand with torchrun.

It launches nothing. Workers started with ``supervisor.url`` (and the shared token) send it
heartbeats. Restarts are ordered *through the workers*: on a hang, every worker process known
at that moment is answered ``exit`` on its next heartbeat and leaves with code 44 — from its
heartbeat thread, so a worker stuck in a collective gets out too — and its torchrun agent
restarts the group, which reloads the latest committed checkpoint. A process that cannot
heartbeat (SIGSTOPped) is ended by its agent once its peers have exited. On SIGTERM the
supervisor answers ``stop``: every worker commits an emergency checkpoint and exits.
"""

from __future__ import annotations

import logging
import os
import signal
import time

from service.config import Config
from service.errors import EXIT_OK, UserError
from service.metrics import SupervisorMetrics
from service.supervisor.ledger import FailureLedger, publish
from service.supervisor.monitor import JobMonitor
from service.supervisor.server import SupervisorEndpoints

log = logging.getLogger(__name__)


class AttachedSupervisor:
    def __init__(self, cfg: Config, token: str):
        sup = cfg.supervisor
        self.cfg = cfg
        self.metrics = SupervisorMetrics()
        self.monitor = JobMonitor(sup.hang_timeout_s)
        ready = lambda: self.monitor.all_fresh(self.monitor.world_size())  # noqa: E731
        self.endpoints = SupervisorEndpoints(cfg, token, self.monitor, self.metrics, ready=ready,
                                             on_restart_observed=self._restart_observed,
                                             on_restart_requested=self._order_restart_now)
        self.server = self.endpoints.control
        self.ledger = FailureLedger(self.monitor, self.metrics, sup.crash_loop_failures)
        self._stop_signal: int | None = None
        self._order_pending = False

    def _restart_observed(self, hb) -> None:  # type: ignore[no-untyped-def]
        if self._stop_signal is not None:
            return
        log.warning("rank %d (node %s) restarted with pid %d", hb.rank, hb.node, hb.pid)
        self.ledger.record("worker_crash", "worker_crash")

    def _order_restart_now(self) -> None:
        self._order_pending = True

    def _gave_up(self) -> bool:
        """Past max_restarts failures without a new commit, stop ordering restarts (the
        JobCrashLooping alert and the state say so); a person has to look."""
        return self.ledger.failures_since_commit > self.cfg.supervisor.max_restarts

    def tick(self) -> None:
        if self._order_pending:
            self._order_pending = False
            self.metrics.restarts.labels(reason="ordered").inc()
            self.monitor.order_restart()
        hung = self.monitor.hung()
        if hung and not self._gave_up():
            desc = ", ".join(f"rank {s.hb.rank} (node {s.hb.node}, step {s.hb.step})" for s in hung)
            # A node whose ranks all stopped reporting (for more than two intervals) is gone;
            # ranks that report but make no progress are hung.
            lost = self.monitor.silent_nodes(2 * self.cfg.supervisor.heartbeat_interval_s)
            if lost:  # every rank of a node went quiet at once: the node (or its link) is gone
                log.error("lost node(s) %s (%s): ordering a restart through the workers", sorted(lost), desc)
                self.ledger.record("lost_node", "lost_node")
            else:
                log.error("hang detected on %s: ordering a restart through the workers", desc)
                self.ledger.record("hang", "hang")
            self.monitor.order_restart(stuck=hung)
        elif hung:
            self.metrics.state.state("failed")
        publish(self.monitor, self.metrics)

    def run(self) -> int:
        def on_signal(signum: int, _frame: object) -> None:
            self._stop_signal = signum

        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, on_signal)
        self.endpoints.start()
        self.metrics.state.state("running")
        log.info("supervising (attach mode) on %s:%d, metrics on %s", self.cfg.supervisor.host,
                 self.server.port, self.endpoints.metrics_address)
        tick = min(0.5, self.cfg.supervisor.heartbeat_interval_s / 2)
        try:
            while self._stop_signal is None:
                self.tick()
                time.sleep(tick)
            # Relay the preemption: workers checkpoint and exit; wait for them, bounded.
            self.metrics.state.state("stopping")
            self.server.stop_all = True
            deadline = time.monotonic() + self.cfg.checkpoint.grace_s + 10
            while time.monotonic() < deadline and self.monitor.ranks:
                fresh = [a for a in self.monitor.heartbeat_ages().values() if a < 3 * self.cfg.supervisor.heartbeat_interval_s]
                if not fresh:
                    break
                time.sleep(tick)
            return EXIT_OK
        finally:
            self.endpoints.stop()


def run_attached(cfg: Config) -> int:
    token = cfg.supervisor.token or os.environ.get("FTDIFF_TOKEN")
    if not token:
        raise UserError("ftdiff supervise needs a shared token: set supervisor.token or FTDIFF_TOKEN")
    try:
        supervisor = AttachedSupervisor(cfg, token)
    except OSError as e:
        raise UserError(f"cannot listen on supervisor/metrics address: {e}") from None
    return supervisor.run()
