"""Prometheus metric definitions (``ftdiff_<subsystem>_<name>_<unit>``).

Every set of metrics takes the registry it registers into, so tests use their own registry and
nothing is registered at import time. Updating a metric is an in-memory operation: the training
step never does network I/O for metrics (Prometheus pulls).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram
from prometheus_client.metrics_core import Metric

from service.vocabulary import FailureKind, RecoveryKind, RestartReason, RollbackReason, StateSource

SAVE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RECOVERY_BUCKETS = (0.5, 1, 1.5, 2, 3, 5, 10, 20, 30, 60, 120, 300)
CHECKPOINT_FAILURE_STAGES = ("snapshot", "write", "manifest", "pointer", "retention", "load")
MEMORY_REJECT_REASONS = ("corrupt", "foreign", "stale")


class CheckpointMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.last_committed_step = Gauge(
            "ftdiff_checkpoint_last_committed_step", "Step of the newest committed checkpoint",
            registry=registry,
        )
        self.last_committed_timestamp = Gauge(
            "ftdiff_checkpoint_last_committed_timestamp_seconds",
            "Unix time of the newest commit", registry=registry,
        )
        self.save_duration = Histogram(
            "ftdiff_checkpoint_save_duration_seconds",
            "Checkpoint save time: stall = training blocked, commit = save start to committed",
            ["phase"], buckets=SAVE_BUCKETS, registry=registry,
        )
        self.load_duration = Histogram(
            "ftdiff_checkpoint_load_duration_seconds", "Checkpoint load time",
            buckets=SAVE_BUCKETS, registry=registry,
        )
        self.bytes_written = Counter(
            "ftdiff_checkpoint_bytes_written_total", "Checkpoint bytes written by this process",
            registry=registry,
        )
        self.failures = Counter(
            "ftdiff_checkpoint_failures_total", "Failed checkpoint operations", ["stage"],
            registry=registry,
        )
        self.verify_failures = Counter(
            "ftdiff_checkpoint_verify_failures_total",
            "Committed checkpoints that failed size/checksum verification", registry=registry,
        )
        self.saves_skipped = Counter(
            "ftdiff_checkpoint_saves_skipped_total",
            "Saves skipped or delayed because the previous one was still in flight",
            registry=registry,
        )
        # Where this start's state came from (a stateset: the one used is 1). "memory": the
        # node-local memory tier (steps newer than the newest commit, left by the survivors of a
        # crash), "object_store": the newest loadable commit, "fresh": nothing to resume.
        self.recovery_source = Enum(
            "ftdiff_checkpoint_recovery_source", "Where this start's state came from",
            states=[source.value for source in StateSource], registry=registry,
        )
        self.memory_steps_recovered = Counter(
            "ftdiff_checkpoint_memory_steps_recovered_total",
            "Steps newer than the newest commit that resumes took from the memory tier (not lost)",
            registry=registry,
        )
        self.memory_snapshots_rejected = Counter(
            "ftdiff_checkpoint_memory_snapshots_rejected_total",
            "Memory-tier snapshots not used on resume: corrupt, foreign (other run or math), "
            "stale (not newer than the newest commit)", ["reason"], registry=registry,
        )
        for stage in CHECKPOINT_FAILURE_STAGES:
            self.failures.labels(stage=stage)
        for phase in ("stall", "commit"):
            self.save_duration.labels(phase=phase)
        for reason in MEMORY_REJECT_REASONS:
            self.memory_snapshots_rejected.labels(reason=reason)


class TrainMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.expected_checkpoint_interval = Gauge(
            "ftdiff_checkpoint_expected_interval_seconds",
            "checkpoint.every_steps x the recent time per step: how often commits should come",
            registry=registry,
        )
        self.step = Gauge("ftdiff_train_step", "Optimizer steps completed", registry=registry)
        self.loss = Gauge("ftdiff_train_loss", "Training loss (global batch mean)", registry=registry)
        self.bad_images = Counter(
            "ftdiff_data_bad_images_total",
            "Undecodable images replaced by the next good one (data.on_bad_image = skip), this rank",
            registry=registry,
        )
        self.samples_per_second = Gauge(
            "ftdiff_train_samples_per_second", "Training throughput over all ranks",
            registry=registry,
        )
        self.nonfinite_steps = Counter(
            "ftdiff_nonfinite_steps_total", "Optimizer updates skipped for a NaN/Inf loss or gradient (every rank counts it)",
            registry=registry,
        )
        self.rollbacks = Counter(
            "ftdiff_rollbacks_total", "In-place rollbacks to the newest good commit after a divergence, by reason "
            "(every rank counts each one)", ["reason"], registry=registry,
        )
        for reason in RollbackReason:  # zero from the start: increase() sees the first one
            self.rollbacks.labels(reason=reason.value)
        self.skipped_samples = Counter(
            "ftdiff_skipped_samples_total", "Positions of the sample stream skipped by rollbacks (every rank counts them)",
            registry=registry,
        )
        self.replica_mismatches = Counter(
            "ftdiff_replica_mismatch_total", "Replica checks that found a node's copy of the state different "
            "(every rank counts each node it names)", ["node"], registry=registry,
        )
        self.data_wait = Counter(
            "ftdiff_data_wait_seconds_total", "Time this rank waited for its next batch (the loader behind)",
            registry=registry,
        )
        self.tracker_failures = Counter(
            "ftdiff_train_tracker_failures_total", "Experiment trackers (logging.trackers) switched off by an error, "
            "by tracker (rank 0; training went on without it)", ["tracker"], registry=registry,
        )
        self.data_wait_share = Gauge(
            "ftdiff_data_wait_ratio", "Share of the recent step time this rank waited for data (goal: <= 0.05)",
            registry=registry,
        )


class WorkerMetrics:
    """Everything a training worker exports."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.checkpoint = CheckpointMetrics(self.registry)
        self.train = TrainMetrics(self.registry)


JOB_STATES = ("starting", "running", "restarting", "backoff", "stopping", "succeeded", "failed")


class SupervisorMetrics:
    """What the supervisor serves on /metrics: job health, plus checkpoint and training
    progress relayed from the workers' heartbeats (one scrape target for the whole job)."""

    def __init__(self, registry: CollectorRegistry | None = None, run: str | None = None):
        from prometheus_client import Enum

        self.registry = registry or CollectorRegistry()
        # Every series served carries the run's name: one Prometheus scraping two runs (or a
        # run and its successor under another name) never merges their series.
        self.exported = LabelledView(self.registry, {"run": run} if run else {})
        r = self.registry
        self.restarts = Counter("ftdiff_job_restarts_total", "Job restarts ordered or observed", ["reason"], registry=r)
        self.failures_detected = Counter(
            "ftdiff_job_failures_detected_total", "Failures detected by the supervisor", ["kind"], registry=r
        )
        self.world_size = Gauge("ftdiff_job_world_size", "Ranks in the current job", registry=r)
        self.state = Enum("ftdiff_job_state", "Job state", states=list(JOB_STATES), registry=r)
        self.rank_relative_speed = Gauge(
            "ftdiff_rank_relative_speed",
            "Each rank's compute speed relative to the fastest rank (1 = fastest): below ~0.7 it holds the job back",
            ["rank", "node"], registry=r,
        )
        self.node_exclusions = Counter(
            "ftdiff_job_node_exclusions", "Nodes left out of the job (supervisor.exclude_*), by why",
            ["node", "reason"], registry=r,
        )
        self.rank_compute_seconds = Gauge(
            "ftdiff_rank_compute_seconds", "Each rank's own compute per step (forward passes; running mean)",
            ["rank", "node"], registry=r,
        )
        self.rank_comm_seconds = Gauge(
            "ftdiff_rank_comm_seconds",
            "Each rank's gradient all-reduce per step, waiting for peers included (running mean): "
            "a straggler's peers show the long ones",
            ["rank", "node"], registry=r,
        )
        self.heartbeat_age = Gauge(
            "ftdiff_worker_heartbeat_age_seconds", "Seconds since each rank's last heartbeat", ["rank"], registry=r
        )
        self.rejected = Counter(
            "ftdiff_supervisor_rejected_requests_total", "Requests refused (bad or missing token, bad body)",
            registry=r,
        )
        # What failures cost (service.supervisor.failure_cost): measured by the restarted rank 0.
        self.recovery_seconds = Histogram(
            "ftdiff_recovery_seconds",
            "Seconds from the job's last completed step before a fault to the first step after the restart",
            ["kind", "source"], buckets=RECOVERY_BUCKETS, registry=r,
        )
        self.steps_lost = Counter(
            "ftdiff_steps_lost_total", "Completed steps that restarts had to train again", ["kind"], registry=r,
        )
        self.goodput = Gauge(
            "ftdiff_job_goodput_ratio", "Useful training time / wall time over the last 10 minutes (NaN at first)",
            registry=r,
        )
        self.goodput.set(float("nan"))
        for kind in RecoveryKind:  # every series from the start: rate() sees the first one
            self.steps_lost.labels(kind=kind.value)
            for source in StateSource:
                self.recovery_seconds.labels(kind=kind.value, source=source.value)
        # Worker metrics arrive with the heartbeats and are re-exported with a rank label, so
        # one scrape of the supervisor covers the whole job.
        self.relay = WorkerRelay()
        r.register(self.relay)
        for reason in RestartReason:
            self.restarts.labels(reason=reason.value)
        for kind in FailureKind:
            self.failures_detected.labels(kind=kind.value)
        self.state.state("starting")


MetricSamples = list[tuple[str, str, str, list[tuple[str, dict[str, str], float]]]]


def metric_samples(registry: CollectorRegistry) -> MetricSamples:
    """A registry's current samples as plain data (family, type, help, samples) for a heartbeat."""
    out: MetricSamples = []
    for family in registry.collect():
        samples = [(s.name, dict(s.labels), float(s.value)) for s in family.samples
                   if not s.name.endswith("_created")]
        out.append((family.name, family.type, family.documentation, samples))
    return out


class WorkerRelay:
    """A custom collector yielding each rank's latest snapshot with an added ``rank`` label.

    Counter resets when a worker restarts are fine: Prometheus' rate() and increase() handle them.
    """

    TYPES = frozenset({"counter", "gauge", "histogram", "summary", "untyped", "unknown", "info",
                       "stateset", "gaugehistogram"})
    # The supervisor's own families: a worker's snapshot never shadows (or spoofs) them.
    RESERVED = ("ftdiff_job_", "ftdiff_worker_heartbeat_", "ftdiff_supervisor_")

    def __init__(self) -> None:
        self._by_rank: dict[int, MetricSamples] = {}

    def update(self, rank: int, snap: MetricSamples) -> None:
        """Keep ``rank``'s snapshot; ValueError (and the previous one kept) if it is malformed."""
        self._by_rank[rank] = self.check(snap)

    @classmethod
    def check(cls, snap: object) -> MetricSamples:
        """A snapshot as relayed, or ValueError: every family [name, type, help, samples] and
        sample [name, labels, value] well formed, so one rank can never break a scrape."""
        import re

        name_ok = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*").fullmatch
        label_ok = re.compile(r"(?!__)[a-zA-Z_][a-zA-Z0-9_]*").fullmatch
        if not isinstance(snap, list):
            raise ValueError("metrics: not a list of families")
        out: MetricSamples = []
        seen: set[str] = set()
        for family in snap:
            if not (isinstance(family, (list, tuple)) and len(family) == 4):
                raise ValueError("metrics: a family is [name, type, help, samples]")
            name, typ, doc, samples = family
            if not (isinstance(name, str) and name_ok(name)) or name.startswith(cls.RESERVED):
                raise ValueError(f"metrics: bad or reserved family name {name!r:.80}")
            if name in seen:
                raise ValueError(f"metrics: family {name} twice")
            seen.add(name)
            if not isinstance(typ, str) or typ not in cls.TYPES or not isinstance(doc, str) \
                    or not isinstance(samples, list):
                raise ValueError(f"metrics: {name}: unknown type {typ!r:.40}, or bad help or samples")
            checked = []
            for sample in samples:
                if not (isinstance(sample, (list, tuple)) and len(sample) == 3):
                    raise ValueError(f"metrics: {name}: a sample is [name, labels, value]")
                sample_name, labels, value = sample
                if not (isinstance(sample_name, str) and sample_name.startswith(name)
                        and name_ok(sample_name)):
                    raise ValueError(f"metrics: {name}: bad sample name {sample_name!r:.80}")
                if not isinstance(labels, dict) or not all(
                        isinstance(k, str) and label_ok(k) and isinstance(v, str) for k, v in labels.items()):
                    raise ValueError(f"metrics: {name}: labels must map label names to strings")
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"metrics: {name}: a sample value is a number")
                try:
                    checked.append((sample_name, dict(labels), float(value)))  # NaN, +-Inf are values
                except OverflowError:
                    raise ValueError(f"metrics: {name}: sample value out of range") from None
            out.append((name, "unknown" if typ == "untyped" else typ, doc, checked))
        return out

    def forget(self, keep: Callable[[int], bool]) -> None:
        for rank in [r for r in self._by_rank if not keep(r)]:
            del self._by_rank[rank]

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for rank, snap in sorted(self._by_rank.items()):
            for name, typ, doc, samples in snap:
                family = families.get(name)
                if family is None:
                    try:
                        family = families[name] = Metric(name, doc, typ)
                    except ValueError:  # checked in update(); never one rank's problem for all
                        continue
                elif family.type != typ:
                    continue  # ranks disagree (version skew): the lowest rank's kind is served
                for sample_name, labels, value in samples:
                    family.add_sample(sample_name, {**labels, "rank": str(rank)}, value)
        yield from families.values()

    def describe(self) -> list[Any]:
        return []  # dynamic: never checked for name collisions at registration


class LabelledView:
    """A registry as served: every sample with ``labels`` added (constant labels, which
    prometheus_client has no other way to attach to a whole registry). Pass it to
    ``generate_latest``; the registry itself stays label-free for code that reads it."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]):
        self.registry, self.labels = registry, labels

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            if not self.labels:
                yield family
                continue
            out = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                out.add_sample(s.name, {**s.labels, **self.labels}, s.value, s.timestamp, s.exemplar)
            yield out
