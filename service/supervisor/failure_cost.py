"""What failures cost the job, as the supervisor serves it: each restart's recovery time and
lost steps (measured by the restarted rank 0, service.train.restart_cost, and counted here once per
process), and the goodput over a sliding window.

Goodput = useful training time / wall time. Useful time is new progress: the job's *watermark*
(the highest step any heartbeat reported) advanced in the window, times the job's time per step
while it runs undisturbed: from one step change to the next in rank 0's heartbeats of one
process (slow steps and checkpoint stalls included; a restart starts a new chain, a hang never
ends one). Steps trained again after a restart do not
move the watermark, so they count as lost time, as do detection, restart and reload. Until the
job has trained for ``MIN_WINDOW_S`` the gauge is NaN (never 0: an alert on low goodput must not
fire at start-up)."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from service.heartbeat import Heartbeat
from service.metrics import SupervisorMetrics
from service.vocabulary import FailureKind, RestartReason, recovery_kind_of

log = logging.getLogger(__name__)

WINDOW_S = 600.0
MIN_WINDOW_S = 30.0
TRAINING = frozenset({"training", "reading", "checkpointing"})
_REMEMBERED = 256  # processes whose recovery was counted (a restarted rank 0 reports for ever)


class FailureCostBook:
    def __init__(self, metrics: SupervisorMetrics, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic):
        self.metrics, self.window_s, self.clock = metrics, window_s, clock
        self._lock = threading.Lock()
        self._counted: OrderedDict[tuple[str, int, float], None] = OrderedDict()
        self._watermark: int | None = None
        self._marks: deque[tuple[float, int]] = deque()  # (time, watermark) when it rose
        self._since: float | None = None  # first heartbeat while training
        # rank 0: (process, time its step last changed, that step)
        self._last: tuple[tuple[str, int, float], float, int] | None = None
        self._runs: deque[tuple[float, float, int]] = deque()  # (time, seconds, steps) of undisturbed runs
        self._diagnosis: str | None = None
        self.started_at = time.time()

    def diagnosed(self, diagnosis: FailureKind | RestartReason) -> None:
        """The supervisor's own diagnosis of the failure the next recovery comes from (a
        ``FailureKind``, or ``RestartReason.ORDERED`` for an operator's restart). It wins over
        the workers' view: after a hang the stuck process is SIGKILLed and its peers see a
        crash; an operator's restart and a lost node in attach mode order processes out like
        a hang."""
        with self._lock:
            self._diagnosis = recovery_kind_of(diagnosis).value

    def reset(self) -> None:
        """A new job under the same supervisor (attach mode): its steps start again."""
        with self._lock:
            self._watermark, self._since, self._last, self._diagnosis = None, None, None, None
            self._marks.clear()
            self._runs.clear()

    def observe(self, hb: Heartbeat) -> None:
        """Every accepted heartbeat (any server thread)."""
        now = self.clock()
        with self._lock:
            if (hb.recovery is not None and hb.rank == 0 and hb.process not in self._counted
                    and hb.recovery["at"] >= self.started_at):  # not one a predecessor counted
                self._count(hb)
            if hb.phase not in TRAINING:
                return
            if self._since is None:
                self._since = now
            if self._watermark is None or hb.step > self._watermark:
                self._watermark = hb.step
                self._marks.append((now, hb.step))
            if hb.rank == 0:
                last = self._last
                if last is None or last[0] != hb.process or hb.step < last[2]:
                    self._last = (hb.process, now, hb.step)  # a new chain
                elif hb.step > last[2]:
                    self._runs.append((now, now - last[1], hb.step - last[2]))
                    self._last = (hb.process, now, hb.step)
            self._trim(now)

    def goodput(self) -> float:
        """Useful time / wall time over the window; NaN until there is enough to say."""
        now = self.clock()
        with self._lock:
            self._trim(now)
            if self._since is None or not self._runs or not self._marks:
                return math.nan
            start = max(now - self.window_s, self._since)
            if now - start < MIN_WINDOW_S:
                return math.nan
            at_start = self._watermark_at(start)
            gained = (self._watermark or 0) - at_start
            per_step = sum(r[1] for r in self._runs) / sum(r[2] for r in self._runs)
            return max(0.0, min(1.0, gained * per_step / (now - start)))

    def publish(self) -> None:
        self.metrics.goodput.set(self.goodput())

    def _count(self, hb: Heartbeat) -> None:
        rec = hb.recovery
        assert rec is not None
        self._counted[hb.process] = None
        while len(self._counted) > _REMEMBERED:
            self._counted.popitem(last=False)
        kind = self._diagnosis or rec["kind"]
        self._diagnosis = None
        log.info("recovery after a %s: state from %s, %d step(s) lost, %.2fs from the last step before "
                 "the fault to the first one after it", kind, rec["source"], rec["steps_lost"], rec["seconds"])
        self.metrics.recovery_seconds.labels(kind=kind, source=rec["source"]).observe(rec["seconds"])
        self.metrics.steps_lost.labels(kind=kind).inc(rec["steps_lost"])

    def _watermark_at(self, t: float) -> int:
        """The watermark at time ``t`` (the newest rise at or before it; else the first one)."""
        before = [step for when, step in self._marks if when <= t]
        return before[-1] if before else self._marks[0][1]

    def _trim(self, now: float) -> None:
        horizon = now - self.window_s
        # Keep the newest rise before the window: it is the watermark at the window's start.
        while len(self._marks) > 1 and self._marks[1][0] <= horizon:
            self._marks.popleft()
        while self._runs and self._runs[0][0] < horizon:
            self._runs.popleft()
