"""torchrun, with exit codes a Kubernetes Job can act on: ``python -m service.train.agent
[torchrun arguments]``.

Plain torchrun exits 1 whatever its workers exited with, so a pod's exit code cannot tell a
configuration error (retrying cannot fix it) from a crash (retrying can). This runs torchrun's
own ``run()`` unchanged and only translates how it ends: when the workers gave up with a code
that means "do not retry" (2 usage/config, 3 storage denied or unreachable, 46 superseded by a
newer start of the job) the agent exits with that code, which the Job's podFailurePolicy turns
into an immediate failure; any other worker failure is 1, a signal to the agent 128 + signal.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from service.errors import EXIT_FAILURE, EXIT_OK, EXIT_STORAGE, EXIT_SUPERSEDED, EXIT_USAGE

log = logging.getLogger(__name__)

# Worker exit codes that no restart can fix, in the order they are reported when ranks differ.
NO_RETRY = (EXIT_USAGE, EXIT_STORAGE, EXIT_SUPERSEDED)


def exit_code_for(worker_codes: Sequence[int]) -> int:
    """The agent's exit code when its workers failed with ``worker_codes``."""
    for code in NO_RETRY:
        if code in worker_codes:
            return code
    return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(list(sys.argv[1:] if argv is None else argv)))
    except ChildFailedError as e:
        codes = [failure.exitcode for failure in e.failures.values()]
        code = exit_code_for(codes)
        log.error("workers failed with exit codes %s: agent exits %d", sorted(set(codes)), code)
        return code
    except SignalException as e:  # SIGTERM/SIGINT to the agent: workers were stopped
        return 128 + int(e.sigval)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
