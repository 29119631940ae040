"""torchrun, with exit codes a Kubernetes Job can act on: ``python -m service.train.agent
[torchrun arguments]``.

Plain torchrun exits 1 whatever its workers exited with, so a pod's exit code cannot tell a
configuration error (retrying cannot fix it) from a crash (retrying can). This runs torchrun's
own ``run()`` unchanged and only translates how it ends: when the workers gave up with a code
that means "do not retry" (2 usage/config, 3 storage denied or unreachable, 46 superseded by a
newer start of the job) the agent exits with that code, which the Job's podFailurePolicy turns
into an immediate failure; any other worker failure is 1, a signal to the agent 128 + signal.

When its workers report to ``ftdiff supervise``, it also ends those of them the supervisor
finds stuck (``service.train.stuck_watch``): with every worker of a node stuck, no peer can.

``FTDIFF_RDZV_POLL_S`` (set by ``ftdiff train``): how often an agent waiting in the c10d
rendezvous looks at the store again, instead of torchrun's fixed second.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from service.errors import EXIT_FAILURE, EXIT_OK, EXIT_STORAGE, EXIT_SUPERSEDED, EXIT_USAGE
from service.train.stuck_watch import StuckWatch, watch_settings

log = logging.getLogger(__name__)

POLL_ENV = "FTDIFF_RDZV_POLL_S"
# Worker exit codes that no restart can fix, in the order they are reported when ranks differ.
NO_RETRY = (EXIT_USAGE, EXIT_STORAGE, EXIT_SUPERSEDED)


def exit_code_for(worker_codes: Sequence[int]) -> int:
    """The agent's exit code when its workers failed with ``worker_codes``."""
    for code in NO_RETRY:
        if code in worker_codes:
            return code
    return EXIT_FAILURE


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


def stop_restarts_on_refusal() -> bool:
    """Make torchrun give up at once, instead of restarting its workers up to --max-restarts
    times, when a worker exited with a code in NO_RETRY: a restart only repeats a refusal of the
    configuration or the storage (and a superseded worker must not come back). Wraps one
    private method of torch's agent; False, leaving torchrun as it is, where it is missing."""
    from torch.distributed.elastic.agent.server.api import WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    monitor = getattr(LocalElasticAgent, "_monitor_workers", None)
    if monitor is None or getattr(monitor, "ftdiff_no_retry", False):
        return monitor is not None

    def monitor_workers(self: Any, worker_group: Any) -> Any:
        result = monitor(self, worker_group)
        codes = [f.exitcode for f in (getattr(result, "failures", None) or {}).values()]
        if result.state == WorkerState.FAILED and any(c in NO_RETRY for c in codes):
            log.error("workers exited %s: a restart cannot fix that, not restarting them", sorted(set(codes)))
            self._remaining_restarts = 0
        return result

    monitor_workers.ftdiff_no_retry = True  # type: ignore[attr-defined]
    LocalElasticAgent._monitor_workers = monitor_workers  # type: ignore[method-assign]
    return True


def _poll_from_env() -> None:
    value = os.environ.get(POLL_ENV)
    if not value:
        return
    try:
        poll_s = float(value)
    except ValueError:
        log.warning("%s=%r is not a number of seconds: the rendezvous polls every second", POLL_ENV, value)
        return
    if not shorten_rendezvous_polls(poll_s):
        log.warning("%s: this torch has no rendezvous poll to shorten; it polls as it always does", POLL_ENV)


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    _poll_from_env()
    if not stop_restarts_on_refusal():
        log.warning("this torch's agent has no _monitor_workers: workers that refuse are restarted")
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    settings = watch_settings(list(args.training_script_args))
    watch = StuckWatch(settings).start() if settings is not None else None
    try:
        run(args)
    except ChildFailedError as e:
        codes = [failure.exitcode for failure in e.failures.values()]
        code = exit_code_for(codes)
        log.error("workers failed with exit codes %s: agent exits %d", sorted(set(codes)), code)
        return code
    except SignalException as e:  # SIGTERM/SIGINT to the agent: workers were stopped
        return 128 + int(e.sigval)
    finally:
        if watch is not None:
            watch.stop()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
