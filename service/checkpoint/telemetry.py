"""What the checkpointer reports: failure counts, metrics and the log lines that go with them.

One object, so the phases (snapshot, commit, resume) never test whether metrics are enabled.
"""

from __future__ import annotations

import logging
import time

from service.checkpoint.collectives import describe_error
from service.metrics import CheckpointMetrics
from service.vocabulary import StateSource

log = logging.getLogger(__name__)


class CheckpointTelemetry:
    def __init__(self, metrics: CheckpointMetrics | None):
        self.metrics = metrics
        self.failures = 0
        self.skipped = 0

    def failure(self, stage: str, step: int | None, err: BaseException | None = None) -> None:
        """A stage of a save (or retention, or a load) failed; the last commit is untouched."""
        self.failures += 1
        if self.metrics:
            self.metrics.failures.labels(stage=stage).inc()
        what = f"step {step}" if step is not None else "checkpoint"
        log.error("checkpoint: %s failed at stage %s: %s", what, stage, describe_error(err))

    def retention_failures(self, count: int) -> None:
        if count and self.metrics:
            self.metrics.failures.labels(stage="retention").inc(count)

    def skipped_save(self) -> None:
        self.skipped += 1
        if self.metrics:
            self.metrics.saves_skipped.inc()

    def bytes_written(self, count: int) -> None:
        if self.metrics:
            self.metrics.bytes_written.inc(count)

    def committed(self, step: int, since: float) -> None:
        if self.metrics:
            self.metrics.last_committed_step.set(step)
            self.metrics.last_committed_timestamp.set(time.time())
            self.metrics.save_duration.labels(phase="commit").observe(time.monotonic() - since)

    def stalled(self, seconds: float) -> None:
        if self.metrics:
            self.metrics.save_duration.labels(phase="stall").observe(seconds)

    def loaded(self, step: int, committed_at: float, since: float) -> None:
        if self.metrics:
            self.metrics.load_duration.observe(time.monotonic() - since)
            self.metrics.last_committed_step.set(step)
            self.metrics.last_committed_timestamp.set(committed_at)

    def unloadable(self) -> None:
        if self.metrics:
            self.metrics.verify_failures.inc()
            self.metrics.failures.labels(stage="load").inc()

    # -- the memory tier and where a start's state came from ------------------------------------
    def resumed_from(self, source: StateSource) -> None:
        """ftdiff_checkpoint_recovery_source."""
        if self.metrics:
            self.metrics.recovery_source.state(source.value)

    def recovered_from_memory(self, steps: int, since: float) -> None:
        """A resume took the state from the memory tier, ``steps`` newer than the newest commit."""
        if self.metrics:
            self.metrics.memory_steps_recovered.inc(max(0, steps))
            self.metrics.load_duration.observe(time.monotonic() - since)

    def memory_rejected(self, reason: str) -> None:
        if self.metrics:
            self.metrics.memory_snapshots_rejected.labels(reason=reason).inc()
