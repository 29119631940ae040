"""torchrun, with exit codes a Kubernetes Job can act on: ``python -m service.node.agent
[torchrun arguments]``.

Plain torchrun exits 1 whatever its workers exited with, so a pod's exit code cannot tell a
configuration error (retrying cannot fix it) from a crash (retrying can). This runs torchrun's
own ``run()`` unchanged and only translates how it ends: when the workers gave up with a code
that means "do not retry" (2 usage/config, 3 storage denied or unreachable, 46 superseded by a
newer start of the job) the agent exits with that code, which the Job's podFailurePolicy turns
into an immediate failure; any other worker failure is 1, a signal to the agent 128 + signal.

When its workers report to ``ftdiff supervise``, it also ends those of them the supervisor
finds stuck (``service.node.stuck_watch``): with every worker of a node stuck, no peer can.

``FTDIFF_RDZV_POLL_S`` (set by ``ftdiff train``): how often an agent waiting in the c10d
rendezvous looks at the store again, instead of torchrun's fixed second.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence

from service.errors import EXIT_DIVERGED, EXIT_FAILURE, EXIT_OK, EXIT_STORAGE, EXIT_SUPERSEDED, EXIT_USAGE
from service.launch_env import RDZV_POLL_ENV, LaunchEnv
from service.node.stuck_watch import StuckWatch, watch_settings
from service.node.torch_patches import shorten_rendezvous_polls, stop_restarts_on_refusal

log = logging.getLogger(__name__)

# Worker exit codes that no restart can fix, in the order they are reported when ranks differ.
NO_RETRY = (EXIT_USAGE, EXIT_STORAGE, EXIT_DIVERGED, EXIT_SUPERSEDED)


def exit_code_for(worker_codes: Sequence[int]) -> int:
    """The agent's exit code when its workers failed with ``worker_codes``."""
    for code in NO_RETRY:
        if code in worker_codes:
            return code
    return EXIT_FAILURE


def _poll_from_env(launch: LaunchEnv) -> None:
    value = launch.rendezvous_poll_s
    if not value:
        return
    try:
        poll_s = float(value)
    except ValueError:
        log.warning("%s=%r is not a number of seconds: the rendezvous polls every second", RDZV_POLL_ENV, value)
        return
    if not shorten_rendezvous_polls(poll_s):
        log.warning("%s: this torch has no rendezvous poll to shorten; it polls as it always does", RDZV_POLL_ENV)


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    launch = LaunchEnv.read()
    _poll_from_env(launch)
    if not stop_restarts_on_refusal(NO_RETRY):
        log.warning("this torch's agent has no _monitor_workers: workers that refuse are restarted")
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    settings = watch_settings(list(args.training_script_args), launch)
    watch = StuckWatch(settings).start() if settings is not None else None
    code = EXIT_OK
    try:
        run(args)
    except ChildFailedError as e:
        codes = [failure.exitcode for failure in e.failures.values()]
        code = exit_code_for(codes)
        log.error("workers failed with exit codes %s: agent exits %d", sorted(set(codes)), code)
    except SignalException as e:  # SIGTERM/SIGINT to the agent: workers were stopped
        code = 128 + int(e.sigval)
    finally:
        if watch is not None:
            watch.stop()
    leave_on_stop_signals(code)
    return code


def leave_on_stop_signals(code: int) -> None:
    """From here on a stop signal ends the agent at once with ``code``, the exit it decided.

    Its workers are gone, but torch's handler (which raises) stays installed through interpreter
    shutdown: a SIGTERM then, such as the supervisor ending a start the workers refused, raised
    inside an exit finalizer and printed a traceback under the user's one-line error."""
    def leave(_signum: int, _frame: object) -> None:
        os._exit(code)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):  # torch's, on POSIX
        signal.signal(sig, leave)


if __name__ == "__main__":
    sys.exit(main())
