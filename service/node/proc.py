"""Processes as Linux shows them in /proc: liveness, state, start time, children, descendants;
and the one parent-death request. Standard library only (the shim imports it)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies — also when this process is
    stopped or stuck, where no thread of its own could notice. Not Linux: no-op."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


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
    if fields is None and not os.path.exists("/proc/self/stat"):  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else
            return True
        return True
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


def start_ticks(pid: int) -> int | None:
    """When a live process started, in clock ticks since boot (field 22 of its stat): with the
    pid, it names the process uniquely while the machine is up."""
    fields = _stat(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def started_at(pid: int) -> float | None:
    """When a live process started (Unix time, to the clock tick: 10 ms), or None."""
    ticks = start_ticks(pid)
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    if ticks is None:
        return None
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def process_identity(pid: int) -> str:
    """"pid@start time": one process, even where pids repeat (pods, restarted containers)."""
    return f"{pid}@{started_at(pid) or 0:.2f}"
