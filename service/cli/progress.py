"""Progress bars for the long read commands (``ckpt verify``, ``export``, ``sample``).

Shown only when stderr is a terminal: piped output, CI logs and tests stay exactly as they
were (one result line on stdout, at most one error line on stderr). Bars are transient, so
the terminal keeps only the result line once a command is done.

The layers below know nothing of rich: a byte bar hands the command a ``dcp_io.ByteCounter``
to pass to the readers (the kind of counter a worker's heartbeats report), step bars take a
plain callback.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # dcp_io imports torch; `ftdiff env` must run where torch does not
    from service.checkpoint.dcp_io import ByteCounter

# How often a byte bar reads the counter; rich redraws at its own pace.
_POLL_S = 0.1


def bars_enabled() -> bool:
    """Whether to draw bars: only for a person watching a terminal."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def _bar(label: str, *columns: Any) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), *columns, TimeRemainingColumn(),
                    console=Console(file=sys.stderr), transient=True)


@contextlib.contextmanager
def byte_progress(label: str, total: int) -> Iterator[ByteCounter]:
    """A bar of the checkpoint bytes the readers given the yielded counter read (of ``total``)."""
    from service.checkpoint.dcp_io import ByteCounter

    counter = ByteCounter()
    if not bars_enabled() or total <= 0:
        yield counter
        return
    from rich.progress import DownloadColumn, TransferSpeedColumn

    stop = threading.Event()
    with _bar(label, DownloadColumn(binary_units=True), TransferSpeedColumn()) as bar:
        task = bar.add_task(label, total=total)

        def poll() -> None:
            while not stop.wait(_POLL_S):
                bar.update(task, completed=min(total, counter.total))

        poller = threading.Thread(target=poll, name="ftdiff-progress", daemon=True)
        poller.start()
        try:
            yield counter
        finally:
            stop.set()
            poller.join()
            bar.update(task, completed=min(total, counter.total))


@contextlib.contextmanager
def step_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A bar of ``total`` steps; the body reports steps done through the callback it gets."""
    if not bars_enabled() or total <= 0:
        yield lambda done: None
        return
    from rich.progress import MofNCompleteColumn

    with _bar(label, MofNCompleteColumn()) as bar:
        task = bar.add_task(label, total=total)
        yield lambda done: bar.update(task, completed=done)


@contextlib.contextmanager
def count_progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A bar whose total the body learns on the way: it reports ``(done, total)``."""
    if not bars_enabled():
        yield lambda done, total: None
        return
    from rich.progress import MofNCompleteColumn

    with _bar(label, MofNCompleteColumn()) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
