"""The words for what went wrong and how the job came back: one enum per concept.

Metric label values, heartbeat wire values and the alert rules all derive from these enums
(tests/unit/test_vocabulary.py checks the rules and the dashboard against them). Adding a fault
kind is a member here, the code that detects it, and the code that reacts to it.
"""

from __future__ import annotations

from enum import StrEnum


class FailureKind(StrEnum):
    """What the supervisor detected (label ``kind`` of ftdiff_job_failures_detected_total)."""

    WORKER_CRASH = "worker_crash"
    """A worker process exited with an error or died of a signal."""
    HANG = "hang"
    """A worker's heartbeat step stopped advancing for supervisor.hang_timeout_s."""
    LOST_NODE = "lost_node"
    """A node's agent (or its whole pod/host) went away."""
    AGENT_FAILED = "agent_failed"
    """A torchrun agent exited with an error of its own."""


class RestartReason(StrEnum):
    """Why the job restarts (label ``reason`` of ftdiff_job_restarts_total)."""

    WORKER_CRASH = "worker_crash"
    HANG = "hang"
    LOST_NODE = "lost_node"
    ORDERED = "ordered"
    """An operator asked for it (POST /restart)."""
    JOB_FAILED = "job_failed"
    """The job as a whole failed (an agent's error); restarted from the newest commit."""
    NODE_EXCLUDED = "node_excluded"
    """A diverged or persistently slow node was left out (supervisor.exclude_*): relaunched smaller."""


class RecoveryKind(StrEnum):
    """What a restart recovered from, as its cost is reported (label ``kind`` of
    ftdiff_recovery_seconds and ftdiff_steps_lost_total; heartbeat ``recovery.kind``)."""

    CRASH = "crash"
    HANG = "hang"
    PREEMPTION = "preemption"
    """Every worker was stopped (SIGTERM) and committed an emergency checkpoint."""
    RESCALE = "rescale"
    """The world grew: torchrun stopped every worker to let a node join."""
    ORDERED = "ordered"


class StateSource(StrEnum):
    """Where a (re)start's state came from (label ``source``; heartbeat ``recovery.source``)."""

    FRESH = "fresh"
    """Nothing to resume: step 0."""
    OBJECT_STORE = "object_store"
    """The newest loadable commit."""
    MEMORY = "memory"
    """The node-local memory tier: the survivors' last completed step."""


def recovery_kind_of(diagnosis: FailureKind | RestartReason) -> RecoveryKind:
    """The supervisor's diagnosis of a failure, as the recovery it leads to. It wins over the
    workers' own view: after a hang the stuck process is SIGKILLed and its peers see a crash."""
    if diagnosis == FailureKind.HANG:
        return RecoveryKind.HANG
    if diagnosis == RestartReason.ORDERED:
        return RecoveryKind.ORDERED
    if diagnosis == RestartReason.NODE_EXCLUDED:
        return RecoveryKind.RESCALE
    return RecoveryKind.CRASH


class RollbackReason(StrEnum):
    """Why the workers rolled the job back in place (label ``reason`` of ftdiff_rollbacks_total)."""

    LOSS_SPIKE = "loss_spike"
    """The loss stayed far above its recent level (divergence.spike_factor, spike_steps)."""
    GRAD_SPIKE = "grad_spike"
    """The gradient norm did."""
    NONFINITE = "nonfinite"
    """divergence.nonfinite_steps non-finite steps in a row."""
    REPLICA_MISMATCH = "replica_mismatch"
    """The ranks' copies of the weights and optimizer state no longer agree."""
