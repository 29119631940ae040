"""Worker -> supervisor heartbeats, and the supervisor's answer (restart orders).

Each worker runs a daemon thread that POSTs its status every ``heartbeat_interval_s`` to the
supervisor with a shared bearer token. The answer may order this very process to exit so that
its torchrun agent restarts it. The thread never blocks training: a supervisor that
cannot be reached costs one short timeout per interval on this thread, nothing else.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import signal
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)

# Exit code of a worker that leaves because the supervisor ordered a restart.
EXIT_RESTART_ORDERED = 44
# Exit code of a worker whose local supervisor or agent died (it must not outlive its job).
EXIT_ORPHANED = 45
# "refused": the worker left with an error a restart cannot fix (config, storage, superseded).
PHASES = ("starting", "loading", "training", "checkpointing", "stopping", "done", "refused")
# Phases spent waiting on storage: their length depends on the store, not on the job's health.
IO_PHASES = frozenset({"loading", "checkpointing", "stopping"})


@dataclass
class Heartbeat:
    rank: int
    local_rank: int
    node: str
    pid: int
    world_size: int
    step: int
    phase: str
    last_committed_step: int | None
    restart_count: int
    time: float
    metrics: list = field(default_factory=list)
    """The worker's metric samples (service.metrics.snapshot), relayed to /metrics."""
    io_bytes: int = 0
    """Checkpoint bytes this process has read and written so far: progress inside a long
    load or save, which the supervisor counts as liveness."""
    started: float = 0.0
    """When this worker process started (Unix time). With node and pid it names one process:
    pods have PID namespaces of their own, so pids repeat across pods and container restarts."""

    @property
    def process(self) -> tuple[str, int, float]:
        return (self.node, self.pid, self.started)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Heartbeat":
        body = json.loads(data)
        hb = cls(
            rank=int(body["rank"]), local_rank=int(body["local_rank"]), node=str(body["node"]),
            pid=int(body["pid"]), world_size=int(body["world_size"]), step=int(body["step"]),
            phase=str(body["phase"]),
            last_committed_step=None if body.get("last_committed_step") is None else int(body["last_committed_step"]),
            restart_count=int(body.get("restart_count", 0)), time=float(body["time"]),
            metrics=list(body.get("metrics", [])), started=float(body.get("started", 0.0)),
            io_bytes=int(body.get("io_bytes", 0)),
        )
        if hb.phase not in PHASES:
            raise ValueError(f"unknown phase {hb.phase!r}")
        return hb


def shared_token(configured: str | None) -> str | None:
    """The job's shared secret: ``supervisor.token``, else FTDIFF_TOKEN (how the local launcher
    and the deploy manifests hand it over). One rule for workers and supervisors alike."""
    return configured or os.environ.get("FTDIFF_TOKEN") or None


def token_ok(header: str | None, token: str) -> bool:
    """Constant-time check of an ``Authorization: Bearer <token>`` header."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].encode(), token.encode())


class HeartbeatSender:
    """The worker's heartbeat thread."""

    def __init__(
        self,
        url: str,
        token: str,
        interval_s: float,
        status: Callable[[], Heartbeat],
        on_exit_order: Callable[[int, list[int]], None] | None = None,
        watch_pids: list[int] | None = None,
    ):
        """``watch_pids``: processes this worker must not outlive (the local supervisor and
        its torchrun agent): when one is gone, the worker exits at its next interval."""
        self.url = url.rstrip("/") + "/heartbeat"
        self.token, self.interval_s, self.status = token, interval_s, status
        self.on_exit_order = on_exit_order or _exit_for_restart
        self.watch_pids = list(watch_pids or [])
        self.sent = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> "HeartbeatSender":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread, then say goodbye: a final heartbeat (phase "done" when the worker
        finished) keeps the supervisor from mistaking a normal exit for a hang."""
        self._stop.set()
        self._thread.join(timeout=2 * self.interval_s + 1)

    def send_once(self, obey: bool = True) -> None:
        request = urllib.request.Request(
            self.url, data=self.status().to_json(), method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=max(0.5, self.interval_s)) as response:
            answer = json.loads(response.read() or b"{}")
        self.sent += 1
        action = answer.get("action") if obey else None
        if action == "exit":  # addressed to this very process (by pid)
            kill = [int(p) for p in answer.get("kill", [])]
            self.on_exit_order(int(answer.get("generation", 0)), kill)

    def _run(self) -> None:
        while not self._stop.is_set():
            gone = [pid for pid in self.watch_pids if not _alive(pid)]
            if gone:
                _exit_orphaned(gone)
            try:
                self.send_once()
            except (OSError, ValueError, urllib.error.URLError) as e:
                self.failed += 1
                if self.failed in (1, 10, 100):  # say so, without flooding the log
                    log.warning("heartbeat to %s failed (%s); training continues", self.url, e)
            self._stop.wait(self.interval_s)
        try:  # the goodbye, from this thread too: the training thread never touches the network
            self.send_once(obey=False)  # the worker is leaving anyway; no order applies now
        except (OSError, ValueError, urllib.error.URLError):
            pass


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies — also when this process is
    stopped or stuck, where no thread of its own could notice. Not Linux: no-op."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _exit_orphaned(gone: list[int]) -> None:
    log.error("the job's supervisor or agent (pid %s) is gone: exiting, so no worker outlives its job",
              ", ".join(map(str, gone)))
    logging.shutdown()
    os._exit(EXIT_ORPHANED)


def _exit_for_restart(generation: int, kill: list[int]) -> None:
    log.error("supervisor ordered a restart (generation %d): exiting so torchrun restarts us", generation)
    # Stuck peers on this node (named by the authenticated supervisor) cannot leave by
    # themselves; without this, torchrun would wait out its grace period before killing them.
    for pid in kill:
        try:
            os.kill(pid, signal.SIGKILL)
            log.error("ended stuck peer process %d on this node", pid)
        except (ProcessLookupError, PermissionError):
            pass
    logging.shutdown()
    # os._exit: the main thread may be stuck in a collective; only a hard exit gets out.
    os._exit(EXIT_RESTART_ORDERED)

