"""The one vocabulary of failures and recoveries: metrics, heartbeats, the supervisor's
relabelling and the alert rules, tests and dashboard all speak it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.heartbeat import RECOVERY_KINDS, RECOVERY_SOURCES, Recovery
from service.metrics import CHECKPOINT_FAILURE_STAGES, JOB_STATES, MEMORY_REJECT_REASONS, SupervisorMetrics
from service.vocabulary import (
    FailureKind,
    RecoveryKind,
    RestartReason,
    RollbackReason,
    StateSource,
    recovery_kind_of,
)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
pytestmark = pytest.mark.timeout(30)

# metric -> label -> the values it may carry
ALLOWED = {
    "ftdiff_job_failures_detected_total": {"kind": set(FailureKind)},
    "ftdiff_job_restarts_total": {"reason": set(RestartReason)},
    "ftdiff_recovery_seconds": {"kind": set(RecoveryKind), "source": set(StateSource)},
    "ftdiff_steps_lost_total": {"kind": set(RecoveryKind)},
    "ftdiff_checkpoint_recovery_source": {"ftdiff_checkpoint_recovery_source": set(StateSource)},
    "ftdiff_job_state": {"ftdiff_job_state": set(JOB_STATES)},
    "ftdiff_checkpoint_failures_total": {"stage": set(CHECKPOINT_FAILURE_STAGES)},
    "ftdiff_checkpoint_memory_snapshots_rejected_total": {"reason": set(MEMORY_REJECT_REASONS)},
    "ftdiff_rollbacks_total": {"reason": set(RollbackReason)},
}
SELECTOR = re.compile(r"(ftdiff_[a-z_]+?)(?:_bucket|_count|_sum)?\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*\\?"([^"\\]*)\\?"')


def _label_values_in_deploy() -> list[tuple[str, str, str, str]]:
    found = []
    for path in [*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.json")]:
        for metric, body in SELECTOR.findall(path.read_text()):
            for label, _op, value in MATCHER.findall(body):
                if label in ALLOWED.get(metric, {}) and "$" not in value:
                    for word in value.split("|"):
                        found.append((path.name, metric, label, word))
    return found


def test_the_deployed_rules_and_dashboard_use_only_vocabulary_words():
    found = _label_values_in_deploy()
    assert found, "the selector no longer finds the rules' label values"
    wrong = [f for f in found if f[3] not in ALLOWED[f[1]][f[2]]]
    assert wrong == []


def test_heartbeats_accept_exactly_the_vocabulary():
    assert RECOVERY_KINDS == {k.value for k in RecoveryKind}
    assert RECOVERY_SOURCES == {s.value for s in StateSource}
    for kind in RecoveryKind:
        for source in StateSource:
            Recovery.from_dict({"kind": kind.value, "source": source.value, "seconds": 1.0,
                                "steps_lost": 0, "at": 1.0})
    with pytest.raises(ValueError):
        Recovery.from_dict({"kind": "meteor", "source": "memory", "seconds": 1.0, "steps_lost": 0, "at": 1.0})


def test_every_vocabulary_series_exists_from_the_start():
    text = "\n".join(line for line in _exposition() if line.startswith("ftdiff_"))
    for kind in FailureKind:
        assert f'ftdiff_job_failures_detected_total{{kind="{kind}"}}' in text
    for reason in RestartReason:
        assert f'ftdiff_job_restarts_total{{reason="{reason}"}}' in text
    for kind in RecoveryKind:
        assert f'ftdiff_steps_lost_total{{kind="{kind}"}}' in text


def _exposition() -> list[str]:
    from prometheus_client import generate_latest

    return generate_latest(SupervisorMetrics().registry).decode().splitlines()


def test_the_supervisors_diagnosis_maps_onto_recovery_kinds():
    assert recovery_kind_of(FailureKind.HANG) is RecoveryKind.HANG
    assert recovery_kind_of(RestartReason.ORDERED) is RecoveryKind.ORDERED
    for kind in (FailureKind.WORKER_CRASH, FailureKind.LOST_NODE, FailureKind.AGENT_FAILED):
        assert recovery_kind_of(kind) is RecoveryKind.CRASH
