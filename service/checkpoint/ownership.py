"""Who may write a checkpoint root: incarnations and fencing.

Every start of the job — first start, torchrun restart, supervisor relaunch — claims the next
*incarnation* of the root: rank 0 creates ``incarnations/<N>.json`` with a create-only write
(S3 ``If-None-Match: *``, ``O_EXCL`` on local disks), so two starts can never hold the same
number, and the number only grows. A writer checks that no newer incarnation exists (one
request) right before each step that changes what counts: DCP's ``.metadata``, the manifest,
the pointer, and every deletion. A writer of an older incarnation — a zombie that was paused,
partitioned or simply slow to die — therefore never commits, never moves ``latest`` and never
deletes anything once a newer start exists. Its shard files carry its incarnation in their
names, so they can never overwrite a newer writer's files either; they are debris.

The records also say which run each start belonged to (``run_id``), which is how a start
knows it is a *restart* of a run rather than a new run (see ``resume``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass

from service.checkpoint.errors import FencedError
from service.checkpoint.storage import Storage

log = logging.getLogger(__name__)

INCARNATIONS = "incarnations"
MAX_CLAIM_ATTEMPTS = 20




@dataclass(frozen=True)
class Incarnation:
    number: int
    run_id: str | None
    time: float


def is_number(stem: str) -> bool:
    """ASCII digits only: "²".isdigit() is True, and int("²") raises (a stray key in the
    bucket must not break every save)."""
    return stem.isascii() and stem.isdigit()


def record_name(number: int) -> str:
    return f"{INCARNATIONS}/{number:09d}.json"


class Ownership:
    def __init__(self, storage: Storage):
        self.storage = storage
        self.number: int | None = None

    def records(self) -> list[Incarnation]:
        """Every incarnation recorded under the root, oldest first (a listing plus reads)."""
        found = []
        for name in self.storage.list_dir(INCARNATIONS):
            stem = name.removesuffix(".json")
            if not is_number(stem):
                continue
            try:
                body = json.loads(self.storage.read_bytes(f"{INCARNATIONS}/{name}"))
                run_id = body.get("run_id")
                found.append(Incarnation(int(stem), str(run_id) if run_id else None, float(body.get("time", 0))))
            except (FileNotFoundError, ValueError, TypeError, AttributeError):
                found.append(Incarnation(int(stem), None, 0.0))  # unreadable: still taken
        return sorted(found, key=lambda r: r.number)

    def claim(self, run_id: str | None, at_least: int = 0) -> int:
        """Create the next incarnation record; its number (one listing, then create-only
        writes). Another start claiming at the same moment makes the create fail, and the next
        number is tried. ``at_least``: the newest incarnation seen anywhere else (in
        manifests), so that deleted records can never hand out a number twice."""
        number = max([*self._numbers(), at_least]) + 1
        body = {"run_id": run_id, "time": time.time(), "host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(MAX_CLAIM_ATTEMPTS):
            try:
                self.storage.create_exclusive(record_name(number), json.dumps(body).encode())
                self.number = number
                return number
            except FileExistsError:
                number += 1
        raise RuntimeError(f"could not claim an incarnation of {self.storage.display_url} "
                           f"after {MAX_CLAIM_ATTEMPTS} attempts (other starts keep racing this one)")

    def check_current(self, what: str) -> None:
        """Raise FencedError if any newer incarnation exists (one listing)."""
        if self.number is None:
            return  # read-only use (tools): nothing to fence
        newer = [n for n in self._numbers() if n > self.number]
        if newer:
            raise FencedError(
                f"not {what}: a newer start (incarnation {max(newer)}) owns {self.storage.display_url}; "
                f"this process (incarnation {self.number}) was superseded and changes nothing there"
            )

    def _numbers(self) -> list[int]:
        names = (name.removesuffix(".json") for name in self.storage.list_dir(INCARNATIONS))
        return [int(stem) for stem in names if is_number(stem)]
