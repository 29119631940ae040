"""The supervisor loop that both modes share.

``Supervisor`` owns what local mode (``ftdiff train``, which launches torchrun agents) and
attach mode (``ftdiff supervise``, which watches a cluster-launched job) have in common: the
heartbeat monitor, the HTTP endpoints, the failure ledger, the metrics, signal handling and the
detection/decision loop. A mode only says how it acts: what to start, how to react to hung
ranks, what to check on each tick, and how to stop.
"""

from __future__ import annotations

import logging
import signal
import time

from service.config import Config
from service.errors import EXIT_OK
from service.heartbeat import LEAVE_SIGNAL, REFUSED_DIVERGED, Heartbeat
from service.metrics import SupervisorMetrics
from service.supervisor.exclusion import ExclusionPolicy
from service.supervisor.failure_cost import FailureCostBook
from service.supervisor.ledger import FailureLedger, publish
from service.supervisor.monitor import JobMonitor, RankState
from service.supervisor.server import SupervisorEndpoints
from service.vocabulary import FailureKind, RestartReason

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, cfg: Config, token: str, known_nodes: set[str] | None = None):
        sup = cfg.supervisor
        self.cfg, self.token = cfg, token
        self.metrics = SupervisorMetrics(run=cfg.run.name)
        self.monitor = JobMonitor(sup.hang_timeout_s, io_timeout_s=sup.io_timeout_s,
                                  first_step_timeout_s=sup.startup_timeout_s,
                                  heartbeat_interval_s=sup.heartbeat_interval_s)
        self.ledger = FailureLedger(self.monitor, self.metrics, sup.crash_loop_failures)
        self.failure_costs = FailureCostBook(self.metrics)
        self.exclusion = ExclusionPolicy(sup)  # which nodes to leave out (a mode acts on it)
        self.endpoints = SupervisorEndpoints(
            cfg, token, self.monitor, self.metrics,
            ready=lambda: self.monitor.all_fresh(self.monitor.world_size()),
            on_restart_observed=self._restart_observed, on_restart_requested=self._restart_requested,
            on_heartbeat=self.failure_costs.observe,
            known_nodes=known_nodes,
        )
        self.server = self.endpoints.control
        self.stop_signal: int | None = None
        self.refused_by: Heartbeat | None = None
        self._restart_request = False

    # -- what a mode provides ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the job's processes, if this mode launches any."""

    def check(self) -> int | None:
        """Once per tick: the job's exit code when it is over, else None."""
        return None

    def on_hung(self, hung: list[RankState]) -> None:
        """Ranks without progress (or heartbeats) for ``hang_timeout_s``: act on them."""
        raise NotImplementedError

    def after_tick(self) -> None:
        """Once per tick, after hang detection."""

    def stop(self) -> int:
        """SIGTERM/SIGINT arrived: end (or leave) the job; the exit code."""
        raise NotImplementedError

    def on_refused(self, hb: Heartbeat) -> int | None:
        """A worker left with an error no restart can fix: the exit code to end with, or None
        to keep watching. Restarting would only repeat the refusal (or fight a newer owner)."""
        return None

    def shutdown(self) -> None:
        """Always called when the loop ends, however it ends."""

    # -- shared ------------------------------------------------------------------------------------
    def record(self, kind: FailureKind, restart: RestartReason | None = None) -> None:
        self.ledger.record(kind, restart)
        self.failure_costs.diagnosed(kind)

    def _restart_observed(self, hb: Heartbeat) -> None:
        if self.stop_signal is not None:
            return  # workers leaving on our own stop order are not crashes
        # One restart of the job, counted once: the other ranks' replacements belong to it.
        log.warning("rank %d (node %s) restarted with pid %d: worker crash (the job restarts)",
                    hb.rank, hb.node, hb.pid)
        self.record(FailureKind.WORKER_CRASH, RestartReason.WORKER_CRASH)

    def _restart_requested(self) -> None:
        self._restart_request = True

    def sleep(self, seconds: float) -> bool:
        """Sleep unless a stop signal arrives; True if one did."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.stop_signal is None:
            time.sleep(0.1)
        return self.stop_signal is not None

    @property
    def tick_s(self) -> float:
        return min(0.5, self.cfg.supervisor.heartbeat_interval_s / 2)

    def run(self) -> int:
        def on_signal(signum: int, _frame: object) -> None:
            self.stop_signal = signum

        stray: list[int] = []

        def on_leave_signal(signum: int, _frame: object) -> None:
            stray.append(signum)  # logged from the loop, not from the handler

        # SIGHUP: the terminal closed (an ssh session dropped). The agents, in a session of their
        # own, never see it: it stops the job like SIGTERM, with an emergency checkpoint.
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        # The workers' leave order, sent here by mistake, would otherwise end the supervisor
        # with no emergency checkpoint and no report.
        previous[LEAVE_SIGNAL] = signal.signal(LEAVE_SIGNAL, on_leave_signal)
        self.endpoints.start()
        try:
            self.start()
            self.metrics.state.state("running")
            while True:
                if self.stop_signal is not None:
                    self.metrics.state.state("stopping")
                    return self.stop()
                if stray:
                    stray.clear()
                    log.warning("signal %d is the workers' order to leave for a restart; the supervisor "
                                "ignores it (SIGTERM or SIGINT stop the job)", LEAVE_SIGNAL)
                code = self.check()
                if code is None and self.monitor.refused is not None:
                    hb, self.monitor.refused = self.monitor.refused, None
                    self.refused_by = hb
                    why = ("training diverged past its rollback budget" if hb.phase == REFUSED_DIVERGED else
                           "a configuration or storage error, or another start owns the checkpoint root")
                    log.error("rank %d (node %s) refused to go on: %s (its message is in the worker log); "
                              "not restarting", hb.rank, hb.node, why)
                    code = self.on_refused(hb)
                if code is not None:
                    self.metrics.state.state("succeeded" if code == EXIT_OK else "failed")
                    return code
                if self._restart_request:
                    self._restart_request = False
                    self.metrics.restarts.labels(reason=RestartReason.ORDERED.value).inc()
                    self.failure_costs.diagnosed(RestartReason.ORDERED)
                    self.monitor.order_restart()
                hung = self.monitor.hung()
                if hung:
                    self.on_hung(hung)
                self.after_tick()
                publish(self.monitor, self.metrics)
                self.failure_costs.publish()
                time.sleep(self.tick_s)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            try:
                self.shutdown()
            finally:
                self.endpoints.stop()
