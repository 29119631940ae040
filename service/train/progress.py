"""Rank 0's view of progress: a live bar on a terminal, log lines (text or JSON) otherwise."""

from __future__ import annotations

import logging
import sys
from types import TracebackType

log = logging.getLogger("service.train")


class ProgressReporter:
    def __init__(self, enabled: bool, start: int, total: int):
        self.enabled, self.start, self.total = enabled, start, total
        self._bar = None
        self._task = None

    def __enter__(self) -> "ProgressReporter":
        if self.enabled and sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=self.total, completed=self.start, loss=float("nan"))
        return self

    def advance(self, step: int, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=loss)

    def log(self, step: int, loss: float, lr: float, samples_per_s: float) -> None:
        if not self.enabled:
            return
        log.info(
            "step %d/%d loss %.5f lr %.2e %.1f samples/s", step, self.total, loss, lr, samples_per_s,
            extra={"step": step, "loss": loss, "lr": lr, "samples_per_s": round(samples_per_s, 2)},
        )

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
