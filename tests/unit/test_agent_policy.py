"""The local launcher's decisions about its agents (service/supervisor/agent_policy.py), as the
state table its docstring gives: no processes, no clock."""

from __future__ import annotations

import pytest

from service.supervisor.agent_policy import (
    Finish,
    GiveUp,
    LauncherState,
    Phase,
    Refuse,
    Relaunch,
    failure_kind,
    on_agent_codes,
    on_ranks_fresh,
)
from service.vocabulary import FailureKind, RestartReason

pytestmark = pytest.mark.timeout(10)
RUNNING = LauncherState()


@pytest.mark.parametrize("codes, phase, action", [
    ({0: None, 1: None}, Phase.RUNNING, None),  # nothing happened
    ({0: 0, 1: None}, Phase.RUNNING, None),  # one node done, the other still training
    ({0: 0, 1: 0}, Phase.OVER, Finish(0)),
    ({0: 2, 1: None}, Phase.OVER, Refuse(2, FailureKind.AGENT_FAILED)),  # config: no relaunch repeats it
    ({0: None, 1: 3}, Phase.OVER, Refuse(3, FailureKind.AGENT_FAILED)),  # storage denied or gone
    ({0: -9, 1: 3}, Phase.OVER, Refuse(3, FailureKind.LOST_NODE)),  # a refusal wins over a lost node
])
def test_exit_codes_decide_the_job(codes, phase, action):
    state, got = on_agent_codes(RUNNING, codes, last_commit=None, max_restarts=3)
    assert (state.phase, got) == (phase, action)


def test_a_lost_node_relaunches_every_agent_in_a_new_round():
    state, action = on_agent_codes(RUNNING, {0: None, 1: -9}, last_commit=10, max_restarts=3)
    assert action == Relaunch(failed=(1,), kind=FailureKind.LOST_NODE, reason=RestartReason.LOST_NODE,
                              also_failed=(), round=1)
    assert state == LauncherState(Phase.RELAUNCHING, relaunches=1, commit_at_relaunch=10, round=1)
    # An agent's own failure (not a signal) is a job failure; two at once are one restart.
    state, action = on_agent_codes(state, {0: 1, 1: 137}, last_commit=10, max_restarts=3)
    assert isinstance(action, Relaunch) and action.reason is RestartReason.JOB_FAILED
    assert action.failed == (0, 1) and action.also_failed == (FailureKind.LOST_NODE,) and action.round == 2


def test_the_budget_counts_relaunches_without_a_new_commit():
    state = RUNNING
    for _ in range(2):
        state, action = on_agent_codes(state, {0: -9}, last_commit=10, max_restarts=2)
        assert isinstance(action, Relaunch)
    state, action = on_agent_codes(state, {0: -9}, last_commit=10, max_restarts=2)
    assert action == GiveUp(0, -9, FailureKind.LOST_NODE) and state.phase is Phase.OVER
    # The same failures with a commit in between each: progress, never given up on.
    state = RUNNING
    for commit in range(20, 30):
        state, action = on_agent_codes(state, {0: -9}, last_commit=commit, max_restarts=2)
        assert isinstance(action, Relaunch) and state.relaunches == 1


def test_a_relaunch_is_over_when_every_rank_reports():
    state, _ = on_agent_codes(RUNNING, {0: -9}, last_commit=None, max_restarts=1)
    assert on_ranks_fresh(state).phase is Phase.RUNNING
    assert on_ranks_fresh(RUNNING) == RUNNING
    over, _ = on_agent_codes(RUNNING, {0: 0}, last_commit=None, max_restarts=1)
    assert on_ranks_fresh(over).phase is Phase.OVER


@pytest.mark.parametrize("code, kind", [(-9, FailureKind.LOST_NODE), (137, FailureKind.LOST_NODE),
                                        (143, FailureKind.LOST_NODE), (1, FailureKind.AGENT_FAILED),
                                        (46, FailureKind.AGENT_FAILED)])
def test_an_agent_ended_by_a_signal_is_a_lost_node(code, kind):
    assert failure_kind(code) is kind
