"""After a save failed mid-run: is the store only having a bad moment, or is it gone for good?

A timeout, a 5xx, throttling or a dropped connection heal by themselves: training goes on and
the next save tries again. Denied access (credentials revoked or expired, a bucket policy
changed) or a deleted bucket do not: restarting the job every few seconds cannot fix them, and
training on without checkpoints only grows what a crash would lose. So after a failed save the
start-up probe runs again, backed off, for a bounded time; if the store still refuses, the job
stops with exit code 3 and one line saying why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from service.checkpoint.storage import Storage
from service.checkpoint.storage_check import check_reachable
from service.errors import StorageError, UserError

log = logging.getLogger(__name__)

FIRST_DELAY_S = 1.0
MAX_PROBES = 12  # with doubling delays, far beyond any sensible checkpoint.storage_retry_s


def storage_verdict(
    storage: Storage,
    single_writer: bool,
    retry_s: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> str | None:
    """None if the store is usable again or failing only transiently; else why the job must
    stop (the store refused for ``retry_s`` seconds of probes 1, 2, 4 ... seconds apart)."""
    deadline, delay = clock() + retry_s, FIRST_DELAY_S
    refusal: UserError | None = None
    for _ in range(MAX_PROBES):
        try:
            check_reachable(storage, write=True, single_writer=single_writer)
            if refusal is not None:
                log.warning("checkpoint storage accepts writes again")
            return None
        except StorageError as e:
            if not e.permanent:
                log.warning("checkpoint storage is failing, probably for a moment: %s; the next save "
                            "tries again", e)
                return None
            refusal = e
        except UserError as e:  # the bucket is gone, conditional writes stopped working
            refusal = e
        if clock() + delay > deadline:
            break
        log.warning("checkpoint storage refuses: %s; probing again in %.0f s", refusal, delay)
        sleep(delay)
        delay *= 2
    return (f"{refusal} — the store kept refusing for {retry_s:.0f} s after a save failed mid-run, so the "
            "job stops rather than train on without checkpoints; fix the access and start the job "
            "again: it resumes from its last commit")


def wait_until_reachable(
    storage: Storage,
    single_writer: bool,
    retry_s: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """A worker's start-up probe. A refusal (denied, no bucket, a wrong URL) raises at once; an
    unreachable or failing store is probed again, backed off, for up to ``retry_s`` seconds — a
    restart that meets a store's bad moment waits it out instead of ending the job."""
    deadline, delay = clock() + retry_s, FIRST_DELAY_S
    for _ in range(MAX_PROBES):
        try:
            check_reachable(storage, write=True, single_writer=single_writer)
            return
        except StorageError as e:
            if e.permanent or clock() + delay > deadline:
                raise
            log.warning("%s; probing again in %.0f s", e, delay)
        sleep(delay)
        delay *= 2
    check_reachable(storage, write=True, single_writer=single_writer)
