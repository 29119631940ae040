"""How a process on a node leaves: on the supervisor's restart order, when its supervisor or
agent is gone, and without the interpreter's finalization once its work is done."""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import NoReturn

from service.errors import EXIT_ORPHANED, EXIT_RESTART_ORDERED
from service.node.proc import children

log = logging.getLogger(__name__)


def exit_orphaned(gone: list[int]) -> NoReturn:
    log.error("the job's supervisor or agent (pid %s) is gone: exiting, so no worker outlives its job",
              ", ".join(map(str, gone)))
    logging.shutdown()
    os._exit(EXIT_ORPHANED)


def safe_to_kill(pid: object, protected: Iterable[int] = ()) -> bool:
    """Whether ``pid`` names one other process this worker may end as a stuck peer. Never pid
    0, -1 or any negative number (a process group, or every process the user may signal), never
    init (1), nor this process, its parent (the torchrun agent, or the warm process that forked
    it), its process group's leader or a ``protected`` pid (its agent), whatever the supervisor's
    answer says."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 1:
        return False
    return pid not in {os.getpid(), os.getppid(), os.getpgrp(), *protected}


def exit_for_restart(generation: int | None, kill: list[int], protected: Iterable[int] = ()) -> NoReturn:
    """Leave on the supervisor's restart order (``generation``; None: by ``LEAVE_SIGNAL``)."""
    how = "by signal" if generation is None else f"generation {generation}"
    log.error("supervisor ordered a restart (%s): exiting so torchrun restarts us", how)
    # Stuck peers on this node (named by the authenticated supervisor) cannot leave by
    # themselves; without this, torchrun would wait out its grace period before killing them.
    for pid in kill:
        if not safe_to_kill(pid, protected):
            log.error("refusing to signal pid %r named as a stuck peer: not a single other process", pid)
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            log.error("ended stuck peer process %d on this node", pid)
        except (ProcessLookupError, PermissionError):
            pass
    # This process's own children (data-loader workers) would linger for seconds after the
    # hard exit below, until their watchdog notices: end them first.
    for pid in children(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    logging.shutdown()
    # os._exit: the main thread may be stuck in a collective; only a hard exit gets out.
    os._exit(EXIT_RESTART_ORDERED)


def exit_process(run: Callable[[], int]) -> NoReturn:
    """Run ``run`` and end the process with its code, skipping the interpreter's finalization.

    When a worker returns, its work is done: checkpoints drained, files closed, process group
    torn down; its output is flushed below. Finalization would still tear down ~3,300 modules
    and every object in them — 0.1–0.3 s, more in a worker forked from the warm process, where
    each object it touches copies a shared page — while torchrun waits for the survivors of a
    crash to be gone before it restarts anyone. An uncaught exception is printed and ends the
    process with 1, as Python would; SystemExit and KeyboardInterrupt take Python's own way."""
    try:
        code = run()
    except Exception:
        traceback.print_exc()
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
