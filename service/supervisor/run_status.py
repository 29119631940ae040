"""A run's state for people and `ftdiff runs ls`: ``<run dir>/status.json``, written by
`ftdiff train` when it starts (running, with its pid and host) and when it ends (finished,
preempted or failed, with the exit code). A status that says running whose supervisor is gone
(same host, pid not alive) reads as failed. Never fatal: a status that cannot be written is a
warning, the job goes on."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from service.errors import EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE
from service.redact import redact_url

log = logging.getLogger(__name__)
STATUS = "status.json"


class RunStatus:
    def __init__(self, run_dir: Path, name: str, checkpoint_url: str, max_steps: int):
        self.path = run_dir / STATUS
        local = None if "://" in checkpoint_url and not checkpoint_url.startswith("file://") else checkpoint_url
        shown = os.path.abspath(local.removeprefix("file://")) if local else redact_url(checkpoint_url)
        self.body: dict[str, Any] = {"name": name, "checkpoint_url": shown, "max_steps": max_steps}
        self._before: dict[str, Any] | None = None  # the status an earlier start left

    def started(self) -> None:
        self._before = read_status(self.path.parent)
        self._write(state="running", pid=os.getpid(), host=socket.gethostname(), started=time.time(), ended=None,
                    exit_code=None)

    def ended(self, code: int) -> None:
        current = read_status(self.path.parent)
        if current is None or (current.get("pid"), current.get("host")) != (os.getpid(), socket.gethostname()):
            return  # another start of this run owns the status now: it is its to write
        if code == EXIT_USAGE:  # refused at the start: it changed nothing, nor does its status
            if self._before is None:
                with contextlib.suppress(OSError):
                    self.path.unlink()
                    self.path.parent.rmdir()  # only if nothing else is there
            else:
                self.body = self._before
                self._write()
            return
        state = {EXIT_OK: "finished", EXIT_PREEMPTED: "preempted"}.get(code, "failed")
        self._write(state=state, exit_code=code, ended=time.time())

    def _write(self, **fields: Any) -> None:
        self.body.update(fields)
        tmp = self.path.with_name(f".{STATUS}.{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.body, indent=1))
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("could not write the run status %s (%s); `ftdiff runs ls` will not show this run's state",
                        self.path, e)


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The status a run left, with ``state`` corrected for a supervisor that is gone."""
    try:
        body = json.loads((run_dir / STATUS).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(body, dict):
        return None
    if body.get("state") == "running" and body.get("host") == socket.gethostname() and not _alive(body.get("pid")):
        body = {**body, "state": "failed", "why": "its supervisor is gone"}
    return body


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
