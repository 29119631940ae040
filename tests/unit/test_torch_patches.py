"""The patches of torch's elastic agent (service/node/torch_patches.py): the agents of `ftdiff
train` look at the rendezvous store every FTDIFF_RDZV_POLL_S, not every second; a worker's
refusal stops torchrun's restarts. And the check that fails when torch changes under them."""

from __future__ import annotations

import time

import pytest
from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dr

from service.launch_env import RDZV_POLL_ENV, LaunchEnv
from service.node import agent, torch_patches

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def restored(monkeypatch):
    """Whatever the test patches in torch's module is put back afterwards."""
    monkeypatch.setattr(dr, "_delay", dr._delay)
    monkeypatch.setattr(dr, "_BackendRendezvousStateHolder", dr._BackendRendezvousStateHolder)


def test_the_poll_and_the_state_cache_follow_the_setting(restored, monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)  # torch's _delay sleeps through time.sleep
    assert torch_patches.shorten_rendezvous_polls(0.1)
    dr._delay(seconds=1)  # the wait between looks at the store
    dr._delay(seconds=0.5)  # any other wait is left alone
    assert slept == [0.1, 0.5]
    holder = dr._BackendRendezvousStateHolder(backend=None, settings=None)
    assert holder._cache_duration == 0.1  # a look at the store is served from at most 0.1 s ago
    assert torch_patches.shorten_rendezvous_polls(0.1)  # twice is once
    dr._delay(seconds=1)
    assert slept[-1] == 0.1


def test_the_environment_sets_it_and_a_bad_value_changes_nothing(restored, monkeypatch, caplog):
    original = dr._delay
    agent._poll_from_env(LaunchEnv.read({RDZV_POLL_ENV: "soon"}))
    assert dr._delay is original
    assert "is not a number" in caplog.text
    agent._poll_from_env(LaunchEnv.read({}))
    assert dr._delay is original  # unset: torchrun as it is
    agent._poll_from_env(LaunchEnv.read({RDZV_POLL_ENV: "0.2"}))
    assert dr._delay is not original


def test_a_torch_without_those_internals_is_left_alone(restored, monkeypatch):
    monkeypatch.delattr(dr, "_delay")
    assert not torch_patches.shorten_rendezvous_polls(0.1)
    assert not hasattr(dr, "_delay")


@pytest.mark.parametrize("asked, used", [(float("inf"), 1.0), (1e400, 1.0), (5.0, 1.0), (float("nan"), 1.0),
                                         (-1.0, 0.01), (0.0, 0.01)])
def test_the_poll_stays_between_a_hundredth_and_torchruns_second(restored, monkeypatch, asked, used):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    assert torch_patches.shorten_rendezvous_polls(asked)
    dr._delay(seconds=1)
    assert slept == [used]


def test_the_installed_torch_still_has_what_every_patch_expects():
    """Fails when torch changes under a patch: then check the patch against the new torch,
    and add its version to CHECKED_TORCH."""
    import importlib
    import inspect

    import torch

    for module_name, names in torch_patches.PATCHED.items():
        module = importlib.import_module(module_name)
        for name in names:
            owner, _, attr = name.rpartition(".")
            if owner:  # an instance attribute: set in the class's own code
                cls = getattr(module, owner)
                assert hasattr(cls, attr) or f"self.{attr}" in inspect.getsource(cls), f"{module_name}:{name}"
            else:
                assert hasattr(module, name), f"{module_name}:{name}"
    assert "cache_duration" in inspect.signature(dr._BackendRendezvousStateHolder).parameters
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    assert list(inspect.signature(LocalElasticAgent._monitor_workers).parameters) == ["self", "worker_group"]
    assert ".".join(torch.__version__.split(".")[:2]) in torch_patches.CHECKED_TORCH


def test_a_refusal_stops_restarts_and_anything_else_does_not(monkeypatch):
    from torch.distributed.elastic.agent.server.api import RunResult, WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    class Failure:
        def __init__(self, code):
            self.exitcode = code

    results = []
    monkeypatch.setattr(LocalElasticAgent, "_monitor_workers", lambda self, group: results[-1])
    assert torch_patches.stop_restarts_on_refusal((2, 3))
    agent_like = type("A", (), {"_remaining_restarts": 5})()
    results.append(RunResult(state=WorkerState.FAILED, failures={0: Failure(1)}))
    LocalElasticAgent._monitor_workers(agent_like, None)
    assert agent_like._remaining_restarts == 5  # a crash: torchrun restarts as usual
    results.append(RunResult(state=WorkerState.FAILED, failures={0: Failure(1), 1: Failure(3)}))
    LocalElasticAgent._monitor_workers(agent_like, None)
    assert agent_like._remaining_restarts == 0  # a refusal: no restart repeats it
