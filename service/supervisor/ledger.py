"""What both supervisors (local and attach mode) keep: the failure count since the last new
commit (crash-loop detection and backoff), the failure/restart metrics, and the periodic
publication of heartbeat-derived metrics."""

from __future__ import annotations

from typing import Any

from service.metrics import SupervisorMetrics
from service.supervisor.monitor import JobMonitor
from service.vocabulary import FailureKind, RestartReason

MAX_BACKOFF_S = 30.0


class FailureLedger:
    def __init__(self, monitor: JobMonitor, metrics: SupervisorMetrics, crash_loop_failures: int):
        self.monitor, self.metrics = monitor, metrics
        self.crash_loop_failures = crash_loop_failures
        self._failures = 0
        self._commit_at_last_failure: int | None = None

    @property
    def failures_since_commit(self) -> int:
        """Failures since the newest commit: 0 again as soon as a new commit is seen — not
        only at the next failure (a stale count would hold a give-up long after the job
        recovered)."""
        if self.monitor.last_committed_step != self._commit_at_last_failure:
            return 0
        return self._failures

    def record(self, kind: FailureKind, restart: RestartReason | None = None) -> None:
        """A failure was detected (and, if ``restart``, a restart follows from it)."""
        self.metrics.failures_detected.labels(kind=FailureKind(kind).value).inc()
        if restart:
            self.metrics.restarts.labels(reason=RestartReason(restart).value).inc()
        committed = self.monitor.last_committed_step
        if committed != self._commit_at_last_failure:  # progress since the last failure
            self._failures = 0
            self._commit_at_last_failure = committed
        self._failures += 1

    def backoff_s(self) -> float:
        """0 until ``crash_loop_failures`` failures without a new commit, then 1, 2, 4 … 30 s."""
        extra = self.failures_since_commit - self.crash_loop_failures
        return 0.0 if extra < 0 else min(MAX_BACKOFF_S, 2.0 ** extra)


def publish(monitor: JobMonitor, metrics: SupervisorMetrics) -> None:
    """Heartbeat ages and world size; drop the series of ranks that no longer exist (a rank
    that left after a shrink must not page as "heartbeat missing" forever)."""
    ages = monitor.heartbeat_ages()
    for rank, age in ages.items():
        metrics.heartbeat_age.labels(rank=str(rank)).set(age)
    for labels in list(metrics.heartbeat_age._metrics):  # the label values published so far
        if int(labels[0]) not in ages:
            metrics.heartbeat_age.remove(*labels)
    times = monitor.step_times()
    _per_rank(metrics.rank_relative_speed, monitor.relative_speeds())
    _per_rank(metrics.rank_compute_seconds, {r: (node, compute) for r, (node, compute, _) in times.items()})
    _per_rank(metrics.rank_comm_seconds, {r: (node, comm) for r, (node, _, comm) in times.items()})
    world = monitor.world_size()
    metrics.world_size.set(world)
    metrics.relay.forget(lambda rank: rank in monitor.ranks or rank < world)


def _per_rank(gauge: Any, values: dict[int, tuple[str, float]]) -> None:
    """Set a {rank, node} gauge to ``values`` (rank -> (node, value)) and drop the series of
    ranks that are gone or now run on another node."""
    for rank, (node, value) in values.items():
        gauge.labels(rank=str(rank), node=node).set(value)
    for labels in list(gauge._metrics):  # the label values published so far
        if values.get(int(labels[0]), ("", 0.0))[0] != labels[1]:
            gauge.remove(*labels)
