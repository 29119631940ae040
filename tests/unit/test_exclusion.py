"""Which nodes the supervisor leaves out (service.supervisor.exclusion), with an injected clock."""

from __future__ import annotations

import json
import logging

import pytest

from service.config.schema import SupervisorConfig
from service.heartbeat import Heartbeat
from service.supervisor.agent_policy import LauncherState, Phase, on_exclusion
from service.supervisor.exclusion import DIVERGED, SLOW, ExclusionPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_nothing_is_left_out_unless_asked():
    policy = ExclusionPolicy(SupervisorConfig())
    assert not policy.enabled
    assert policy.due({"1"}, {0: ("0", 1.0), 1: ("1", 0.1)}) == {}


def test_a_diverged_node_is_due_at_once():
    policy = ExclusionPolicy(SupervisorConfig(exclude_diverged_nodes=True))
    assert policy.due({"2"}, {}) == {"2": DIVERGED}


def test_a_node_is_due_once_its_slowest_rank_stayed_slow_long_enough():
    clock = Clock()
    policy = ExclusionPolicy(SupervisorConfig(exclude_slow_after_s=10), clock)
    speeds = {0: ("a", 1.0), 1: ("a", 0.9), 2: ("b", 1.0), 3: ("b", 0.5)}  # node b's rank 3 is slow
    assert policy.due(set(), speeds) == {}
    clock.now += 9.9
    assert policy.due(set(), speeds) == {}
    clock.now += 0.2
    assert policy.due(set(), speeds) == {"b": SLOW}
    # Caught up for a moment: the clock starts over.
    assert policy.due(set(), {**speeds, 3: ("b", 0.8)}) == {}
    clock.now += 5
    assert policy.due(set(), speeds) == {}
    clock.now += 10
    assert policy.due(set(), speeds) == {"b": SLOW}


def test_leaving_nodes_out_is_bounded_by_min_nodes_and_said_once(caplog):
    policy = ExclusionPolicy(SupervisorConfig(exclude_diverged_nodes=True))
    assert policy.may_leave(3, {"1": DIVERGED}, min_nodes=2) == {"1": DIVERGED}
    assert policy.may_leave(1, {"0": DIVERGED}, min_nodes=1) == {}  # never the last node
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        for _ in range(3):  # every tick asks again
            assert policy.may_leave(2, {"1": DIVERGED}, min_nodes=None) == {}  # unset: no shrinking
            assert policy.may_leave(2, {"1": DIVERGED}, min_nodes=2) == {}
    said = [r.message for r in caplog.records if "keeping it; cordon the node" in r.message]
    assert len(said) == 1 and said[0].startswith("node 1: diverged replica"), said


def test_as_many_due_nodes_go_as_min_nodes_allows_diverged_ones_first(caplog):
    policy = ExclusionPolicy(SupervisorConfig(exclude_diverged_nodes=True, exclude_slow_after_s=1))
    due = {"3": SLOW, "2": DIVERGED, "1": SLOW}
    assert policy.may_leave(4, due, min_nodes=3) == {"2": DIVERGED}
    assert policy.may_leave(4, due, min_nodes=2) == {"2": DIVERGED, "1": SLOW}
    assert policy.may_leave(4, due, min_nodes=1) == due


def test_an_exclusion_relaunches_in_a_fresh_round_without_spending_the_budget():
    state = on_exclusion(LauncherState(relaunches=2, round=4))
    assert (state.phase, state.round, state.relaunches) == (Phase.RELAUNCHING, 5, 2)


def test_heartbeats_carry_node_names_and_refuse_anything_else():
    from tests.unit.test_supervisor import hb

    body = {**hb(0, 100).__dict__, "suspect_nodes": ["node-a"]}
    assert Heartbeat.from_json(json.dumps(body).encode()).suspect_nodes == ["node-a"]
    for bad in ("node-a", [""], [7], ["x" * 254], ["n"] * 65):
        with pytest.raises(ValueError, match="suspect_nodes"):
            Heartbeat.from_json(json.dumps({**body, "suspect_nodes": bad}).encode())
