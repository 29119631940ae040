"""Processes as Linux shows them in /proc: liveness, children, descendants. Shared by the
local supervisor (which ends its agents' trees) and the torchrun agent wrapper (which ends its
own stuck workers in attach mode)."""

from __future__ import annotations

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
