"""The agents of `ftdiff train` look at the rendezvous store every FTDIFF_RDZV_POLL_S, not
every second (service.train.agent): what torchrun's c10d rendezvous does between looks."""

from __future__ import annotations

import time

import pytest
from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dr

from service.train import agent

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def restored(monkeypatch):
    """Whatever the test patches in torch's module is put back afterwards."""
    monkeypatch.setattr(dr, "_delay", dr._delay)
    monkeypatch.setattr(dr, "_BackendRendezvousStateHolder", dr._BackendRendezvousStateHolder)


def test_the_poll_and_the_state_cache_follow_the_setting(restored, monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)  # torch's _delay sleeps through time.sleep
    assert agent.shorten_rendezvous_polls(0.1)
    dr._delay(seconds=1)  # the wait between looks at the store
    dr._delay(seconds=0.5)  # any other wait is left alone
    assert slept == [0.1, 0.5]
    holder = dr._BackendRendezvousStateHolder(backend=None, settings=None)
    assert holder._cache_duration == 0.1  # a look at the store is served from at most 0.1 s ago
    assert agent.shorten_rendezvous_polls(0.1)  # twice is once
    dr._delay(seconds=1)
    assert slept[-1] == 0.1


def test_the_environment_sets_it_and_a_bad_value_changes_nothing(restored, monkeypatch, caplog):
    original = dr._delay
    monkeypatch.setenv(agent.POLL_ENV, "soon")
    agent._poll_from_env()
    assert dr._delay is original
    assert "is not a number" in caplog.text
    monkeypatch.delenv(agent.POLL_ENV)
    agent._poll_from_env()
    assert dr._delay is original  # unset: torchrun as it is
    monkeypatch.setenv(agent.POLL_ENV, "0.2")
    agent._poll_from_env()
    assert dr._delay is not original


def test_a_torch_without_those_internals_is_left_alone(restored, monkeypatch):
    monkeypatch.delattr(dr, "_delay")
    assert not agent.shorten_rendezvous_polls(0.1)
    assert not hasattr(dr, "_delay")


@pytest.mark.parametrize("asked, used", [(float("inf"), 1.0), (1e400, 1.0), (5.0, 1.0), (float("nan"), 1.0),
                                         (-1.0, 0.01), (0.0, 0.01)])
def test_the_poll_stays_between_a_hundredth_and_torchruns_second(restored, monkeypatch, asked, used):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    assert agent.shorten_rendezvous_polls(asked)
    dr._delay(seconds=1)
    assert slept == [used]
