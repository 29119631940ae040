"""``ftdiff supervise``: watch a job launched by Kubernetes, Slurm or by hand with torchrun.

It launches nothing. Workers started with ``supervisor.url`` (and the shared token) send it
heartbeats. Restarts are ordered *through the workers*: on a hang, every worker process known
at that moment is answered ``exit`` on its next heartbeat and leaves with code 44 — from its
heartbeat thread, so a worker stuck in a collective gets out too — and its torchrun agent
restarts the group, which reloads the latest committed checkpoint. A process that cannot
heartbeat (SIGSTOPped) is ended by its agent once its peers have exited. On SIGTERM the
supervisor simply leaves: the job trains on, and a restarted supervisor picks it up from the
next heartbeats (exit orders name one process — node, pid, start time — and expire).
"""

from __future__ import annotations

import logging

from service.config import Config
from service.errors import EXIT_OK, UserError
from service.heartbeat import Heartbeat, shared_token
from service.metrics import FailureKind, RestartReason
from service.supervisor.core import Supervisor
from service.supervisor.monitor import RankState

log = logging.getLogger(__name__)


class AttachedSupervisor(Supervisor):
    def start(self) -> None:
        log.info("supervising (attach mode) on %s:%d, metrics on %s", self.cfg.supervisor.host,
                 self.server.port, self.endpoints.metrics_address)

    def _gave_up(self) -> bool:
        """Past max_restarts failures without a new commit, stop ordering restarts (the
        JobCrashLooping alert and the state say so); a person has to look."""
        return self.ledger.failures_since_commit > self.cfg.supervisor.max_restarts

    def on_hung(self, hung: list[RankState]) -> None:
        if self._gave_up() or self.refused_by is not None:
            self.metrics.state.state("failed")
            return
        desc = ", ".join(f"rank {s.hb.rank} (node {s.hb.node}, step {s.hb.step})" for s in hung)
        # A node whose ranks all stopped reporting (for more than two intervals) is gone;
        # ranks that report but make no progress are hung.
        lost = self.monitor.silent_nodes(2 * self.cfg.supervisor.heartbeat_interval_s)
        if lost:  # every rank of a node went quiet at once: the node (or its link) is gone
            log.error("lost node(s) %s (%s): ordering a restart through the workers", sorted(lost), desc)
            self.record(FailureKind.LOST_NODE, RestartReason.LOST_NODE)
        else:
            log.error("hang detected on %s: ordering a restart through the workers", desc)
            self.record(FailureKind.HANG, RestartReason.HANG)
        self.monitor.order_restart(stuck=hung)

    def on_refused(self, hb: Heartbeat) -> int | None:
        self.metrics.state.state("failed")
        return None  # a Deployment: it stays, reporting the failure until a person acts

    def stop(self) -> int:
        """Leave; the job trains on. The supervisor is a watchdog beside the job, and it gets
        rolled, drained and rescheduled like any Deployment: its SIGTERM says nothing about the
        workers (the cluster sends them their own on preemption). A new supervisor rebuilds its
        view from the next heartbeats."""
        log.warning("signal %d: leaving; the job trains on without a watchdog until a supervisor "
                    "is back", self.stop_signal)
        return EXIT_OK


def run_attached(cfg: Config) -> int:
    token = shared_token(cfg.supervisor.token)
    if not token:
        raise UserError("ftdiff supervise needs a shared token: set supervisor.token or FTDIFF_TOKEN")
    try:
        supervisor = AttachedSupervisor(cfg, token)
    except OSError as e:
        raise UserError(f"cannot listen on supervisor/metrics address: {e}") from None
    return supervisor.run()
