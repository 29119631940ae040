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
import threading
import time
from collections.abc import Callable

from service.checkpoint.storage import Storage
from service.checkpoint.storage_check import check_reachable
from service.errors import StorageError, UserError

log = logging.getLogger(__name__)

FIRST_DELAY_S = 1.0
MAX_PROBES = 30  # a bound on the loop whatever the clock does; the deadline ends it first


class Backoff:
    """Waits 1, 2, 4 ... seconds, the last one cut to end exactly at the deadline, and stops
    early when ``stop`` is set (a SIGTERM: a preempted job must not sit out the retry)."""

    def __init__(self, retry_s: float, stop: threading.Event | None = None,
                 sleep: Callable[[float], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.clock, self.stop = clock, stop or threading.Event()
        self.sleep = sleep or (lambda s: self.stop.wait(s))
        self.started, self.deadline, self.delay = clock(), clock() + retry_s, FIRST_DELAY_S

    def wait(self) -> bool:
        """Sleep until the next probe; False when the deadline is reached or a stop came."""
        left = self.deadline - self.clock()
        if left <= 0 or self.stop.is_set():
            return False
        self.sleep(min(self.delay, left))
        self.delay *= 2
        return not self.stop.is_set()

    def elapsed(self) -> float:
        return self.clock() - self.started


def storage_verdict(
    storage: Storage,
    single_writer: bool,
    retry_s: float,
    stop: threading.Event | None = None,
    sleep: Callable[[float], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> str | None:
    """None if the store is usable again or failing only transiently; else why the job must
    stop: the store still refused after ``retry_s`` seconds of probes (or a stop came first)."""
    backoff = Backoff(retry_s, stop, sleep, clock)
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
        log.warning("checkpoint storage refuses: %s; probing again in %.0f s", refusal,
                    min(backoff.delay, max(0.0, backoff.deadline - clock())))
        if not backoff.wait():
            break
    why = "a stop signal came" if backoff.stop.is_set() else "it kept refusing"
    return (f"{refusal} — {why} {backoff.elapsed():.0f} s after a save failed mid-run, so the job stops "
            "rather than train on without checkpoints; fix the access and start the job again: it "
            "resumes from its last commit")


def wait_until_reachable(
    storage: Storage,
    single_writer: bool,
    retry_s: float,
    sleep: Callable[[float], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """A worker's start-up probe. A refusal (denied, no bucket, a wrong URL) raises at once; an
    unreachable or failing store is probed again, backed off, for up to ``retry_s`` seconds — a
    restart that meets a store's bad moment waits it out instead of ending the job."""
    backoff = Backoff(retry_s, None, sleep, clock)
    for _ in range(MAX_PROBES):
        try:
            check_reachable(storage, write=True, single_writer=single_writer)
            return
        except StorageError as e:
            if e.permanent or not backoff.wait():
                raise
            log.warning("%s; probing again", e)
    check_reachable(storage, write=True, single_writer=single_writer)
