"""Judging whether training diverged: loss or gradient-norm spikes, and runs of non-finite steps.

Pure bookkeeping over the series every rank sees identically (the all-reduced loss and the
DDP-averaged gradient norm), so every rank reaches the same verdict at the same step without
a collective of its own. A value *spikes* when it is above ``factor`` times its recent robust
level (the median of the last ``history`` accepted values); ``spike_steps`` spiking steps in a
row, or ``nonfinite_steps`` non-finite steps in a row, are a divergence. While a spike is being
judged (at least one suspicious step, no verdict yet) the detector says so: checkpoints taken
then are marked and never become a rollback target. Suspicious values never enter the history,
so a long spike cannot raise the level it is judged against.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

from service.vocabulary import RollbackReason

MIN_HISTORY = 10  # values before a level is trusted: the first steps of a run move fast


@dataclass(frozen=True)
class Divergence:
    """A verdict: roll back. ``first_step`` is the first step of the offending run of steps,
    ``last_step`` the step the verdict came at."""

    reason: RollbackReason
    first_step: int
    last_step: int
    value: float = math.nan
    level: float = math.nan
    detail: str = ""

    def describe(self) -> str:
        if self.reason is RollbackReason.REPLICA_MISMATCH:
            return f"diverged replicas at step {self.last_step}: {self.detail}"
        if self.reason is RollbackReason.NONFINITE:
            return f"non-finite loss or gradients at steps {self.first_step}..{self.last_step}"
        what = "loss" if self.reason is RollbackReason.LOSS_SPIKE else "gradient norm"
        return (f"{what} spike at steps {self.first_step}..{self.last_step} ({what} {self.value:.4g}, "
                f"{self.value / self.level:.1f}x its recent level {self.level:.4g})")


class SpikeDetector:
    def __init__(self, factor: float, spike_steps: int, nonfinite_steps: int, history: int):
        """``factor`` 0 turns spike detection off (runs of non-finite steps are still judged)."""
        self.factor, self.spike_steps, self.nonfinite_steps = factor, spike_steps, nonfinite_steps
        self._loss: deque[float] = deque(maxlen=history)
        self._norm: deque[float] = deque(maxlen=history)
        self._suspect_since: int | None = None
        self._spiking = 0
        self._nonfinite = 0

    @property
    def judging_since(self) -> int | None:
        """The first step of the spike being judged now, or None."""
        return self._suspect_since

    def observe(self, step: int, loss: float, grad_norm: float | None) -> Divergence | None:
        """One optimizer step's (global) loss and gradient norm (None: not known, e.g. an fp16
        overflow the grad scaler handles); a verdict, or None."""
        if not (math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))):
            self._nonfinite += 1
            self._suspect(step)
            if self._nonfinite >= self.nonfinite_steps:
                return self._verdict(RollbackReason.NONFINITE, step, math.nan, math.nan)
            return None
        self._nonfinite = 0
        loss_level, norm_level = self._level(self._loss), self._level(self._norm)
        loss_high = self._high(loss, loss_level)
        norm_high = grad_norm is not None and self._high(grad_norm, norm_level)
        if not (loss_high or norm_high):
            self._spiking, self._suspect_since = 0, None
            self._loss.append(loss)
            if grad_norm is not None:
                self._norm.append(grad_norm)
            return None
        self._spiking += 1
        self._suspect(step)
        if self._spiking >= self.spike_steps:
            if loss_high:
                return self._verdict(RollbackReason.LOSS_SPIKE, step, loss, loss_level or 0.0)
            return self._verdict(RollbackReason.GRAD_SPIKE, step, grad_norm or 0.0, norm_level or 0.0)
        return None

    def reset(self) -> None:
        """After a rollback: the history is the rolled-back run's; judge afresh."""
        self._loss.clear()
        self._norm.clear()
        self._suspect_since, self._spiking, self._nonfinite = None, 0, 0

    def _suspect(self, step: int) -> None:
        if self._suspect_since is None:
            self._suspect_since = step

    def _level(self, values: deque[float]) -> float | None:
        return statistics.median(values) if len(values) >= MIN_HISTORY else None

    def _high(self, value: float, level: float | None) -> bool:
        return bool(self.factor) and level is not None and level > 0 and value > self.factor * level

    def _verdict(self, reason: RollbackReason, step: int, value: float, level: float) -> Divergence:
        first = self._suspect_since if self._suspect_since is not None else step
        return Divergence(reason, first, step, value, level)
