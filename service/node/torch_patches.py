"""Patches of torch's elastic-agent internals: the only place ftdiff changes torch's behaviour.

Each patch wraps or replaces one private name of ``torch.distributed.elastic``, checks first
that the name is there with the shape it was written against, and does nothing (returning
False) where it is not, so a torch that changed under it runs as plain torchrun. Checked
against torch 2.11, 2.12, 2.13 and 2.14 (``CHECKED_TORCH``); tests/unit/test_torch_patches.py
fails when the installed torch no longer has what a patch expects.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

log = logging.getLogger(__name__)

CHECKED_TORCH = ("2.11", "2.12", "2.13", "2.14")
# The private names the patches touch (module: names), for the reader and for the test.
PATCHED = {
    "torch.distributed.elastic.rendezvous.dynamic_rendezvous": ("_delay", "_BackendRendezvousStateHolder"),
    "torch.distributed.elastic.agent.server.local_elastic_agent": ("LocalElasticAgent._monitor_workers",),
    "torch.distributed.elastic.agent.server.api": ("SimpleElasticAgent._remaining_restarts",),
}


def shorten_rendezvous_polls(poll_s: float) -> bool:
    """Make torchrun's c10d rendezvous look at the store every ``poll_s`` (0.01 to 1 s) instead
    of every second.

    While an agent waits for the others to join (or for a round to close) it sleeps a fixed
    second between looks, and serves those looks from a state it read up to a second before;
    agents that join together therefore wait a second for one another, which on one machine is
    most of a lost node's rendezvous. Only those two change (torchrun's random start-up jitter
    does not). False, leaving torchrun as it is, where this torch version has neither to shorten."""
    import inspect

    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as dr

    delay, holder = getattr(dr, "_delay", None), getattr(dr, "_BackendRendezvousStateHolder", None)
    if delay is None or holder is None or "cache_duration" not in inspect.signature(holder).parameters:
        return False
    if getattr(delay, "ftdiff_poll_s", None) is not None:
        return True  # already done
    poll_s = min(1.0, max(0.01, poll_s)) if poll_s == poll_s else 1.0  # NaN: torchrun's second

    def short_delay(seconds: float | tuple[float, float]) -> None:
        delay(poll_s if seconds == 1 else seconds)

    class FresherStateHolder(holder):  # type: ignore[misc, valid-type]
        def __init__(self, backend: Any, settings: Any, cache_duration: float = poll_s) -> None:
            super().__init__(backend, settings, cache_duration)

    short_delay.ftdiff_poll_s = poll_s  # type: ignore[attr-defined]
    dr._delay = short_delay
    dr._BackendRendezvousStateHolder = FresherStateHolder
    return True


def stop_restarts_on_refusal(no_retry: Collection[int]) -> bool:
    """Make torchrun give up at once, instead of restarting its workers up to --max-restarts
    times, when a worker exited with a code in ``no_retry``: a restart only repeats a refusal of
    the configuration or the storage (and a superseded worker must not come back). Wraps one
    private method of torch's agent; False, leaving torchrun as it is, where it is missing."""
    from torch.distributed.elastic.agent.server.api import WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    monitor = getattr(LocalElasticAgent, "_monitor_workers", None)
    if monitor is None or getattr(monitor, "ftdiff_no_retry", False):
        return monitor is not None

    def monitor_workers(self: Any, worker_group: Any) -> Any:
        result = monitor(self, worker_group)
        codes = [f.exitcode for f in (getattr(result, "failures", None) or {}).values()]
        if result.state == WorkerState.FAILED and any(c in no_retry for c in codes):
            log.error("workers exited %s: a restart cannot fix that, not restarting them", sorted(set(codes)))
            self._remaining_restarts = 0
        return result

    monitor_workers.ftdiff_no_retry = True  # type: ignore[attr-defined]
    LocalElasticAgent._monitor_workers = monitor_workers  # type: ignore[method-assign]
    return True
