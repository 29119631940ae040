"""Processes as Linux shows them in /proc: liveness, state, start time, children, descendants. Shared by the
local supervisor (which ends its agents' trees) and the torchrun agent wrapper (which ends its
own stuck workers in attach mode)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """True for a live process (a zombie awaiting its parent counts as gone)."""
    fields = _stat(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def stopped(pid: int) -> bool:
    """True for a process stopped by a signal (SIGSTOP, SIGTSTP) or a tracer."""
    fields = _stat(pid)
    return bool(fields) and fields[0] in ("T", "t")


def children(pid: int) -> list[int]:
    """Direct child pids of ``pid``."""
    out: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    if not task_dir.exists():
        return out
    for task in task_dir.iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, children before their own children."""
    found: list[int] = []
    frontier = [pid]
    for _ in range(8):  # agent -> workers -> data loader workers: a few levels at most
        frontier = [c for p in frontier for c in children(p)]
        if not frontier:
            break
        found += frontier
    return found


def started_at(pid: int) -> float | None:
    """When a live process started (Unix time, to the clock tick: 10 ms), or None."""
    fields = _stat(pid)
    try:
        ticks = int(fields[19]) if fields else None
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    if ticks is None:
        return None
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
