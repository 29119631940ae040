"""Processes as Linux shows them in /proc: liveness, children, descendants. Shared by the
local supervisor (which ends its agents' trees) and the torchrun agent wrapper (which ends its
own stuck workers in attach mode)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True for a live process (a zombie awaiting its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


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
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
