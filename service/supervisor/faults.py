"""Fault injection from outside the job — for tests and benchmarks, never the product's path.

Every fault goes through the real mechanism (a signal to a pid, bytes changed in storage), so
the detection code under test is the code that runs in production.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def kill9(pid: int) -> None:
    """A crash: the process disappears without any chance to clean up."""
    os.kill(pid, signal.SIGKILL)


def freeze(pid: int) -> None:
    """A hang: the process stays alive but stops running (heartbeats included)."""
    os.kill(pid, signal.SIGSTOP)


def thaw(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)


def children(pid: int) -> list[int]:
    """Direct child pids of ``pid`` (Linux /proc)."""
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


def corrupt_newest(url: str) -> int:
    """Flip one byte in a shard of the newest committed checkpoint; returns its step."""
    from service.checkpoint.catalog import Catalog
    from service.checkpoint.manifest import step_dir
    from service.checkpoint.storage import open_storage

    catalog = Catalog(open_storage(url))
    found = catalog.latest()
    if found is None:
        raise RuntimeError(f"no committed checkpoint under {url}")
    step, manifest = found
    shard = next(name for name in sorted(manifest.files) if name.endswith(".distcp"))
    path = catalog.storage.path(step_dir(step), shard)
    data = bytearray(catalog.storage.fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    catalog.storage.fs.pipe_file(path, bytes(data))
    return step
