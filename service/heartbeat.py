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
import math
import signal
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from service.launch_env import LaunchEnv
from service.node.exits import exit_for_restart, exit_orphaned, safe_to_kill
from service.node.proc import pid_alive
from service.vocabulary import RecoveryKind, StateSource

log = logging.getLogger(__name__)

# A restart order by signal, from a supervisor on the worker's own machine (it knows the pid):
# the worker leaves its last completed step in the memory tier and exits at once, instead of
# at its next heartbeat.
LEAVE_SIGNAL = signal.SIGUSR1
# "refused": the worker left with an error a restart cannot fix (config, superseded);
# "refused-storage": the same, the storage's (denied, bucket gone): the job ends with exit 3.
# "refused-diverged": training diverged past its rollback budget: the job ends with exit 47.
REFUSED, REFUSED_STORAGE, REFUSED_DIVERGED = "refused", "refused-storage", "refused-diverged"
# "reading": waiting for the next batch (shards may be read from storage meanwhile).
PHASES = ("starting", "loading", "training", "reading", "checkpointing", "stopping", "done", REFUSED,
          REFUSED_STORAGE, REFUSED_DIVERGED)
# Phases spent waiting on storage: their length depends on the store, not on the job's health.
IO_PHASES = frozenset({"loading", "reading", "checkpointing", "stopping"})


# What a restart cost, as rank 0 measures it (service.train.restart_cost): fault kinds and where
# the state came from.
RECOVERY_KINDS = frozenset(kind.value for kind in RecoveryKind)
RECOVERY_SOURCES = frozenset(source.value for source in StateSource)


@dataclass(frozen=True)
class Recovery:
    """One restart's cost, as rank 0 reports it in its heartbeats."""

    kind: str
    source: str
    seconds: float
    steps_lost: int
    at: float
    """When it was measured (Unix time): a supervisor started later does not count it again."""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, body: object) -> "Recovery":
        """Validate what a heartbeat carried; ValueError unless a real worker can have sent it."""
        if not isinstance(body, dict) or set(body) != {"kind", "source", "seconds", "steps_lost", "at"}:
            raise ValueError("recovery must be an object with kind, source, seconds, steps_lost and at")
        kind, source, seconds, lost = body["kind"], body["source"], body["seconds"], body["steps_lost"]
        at = body["at"]
        if isinstance(at, bool) or not isinstance(at, int | float) or not (math.isfinite(at) and at >= 0):
            raise ValueError("recovery at must be a finite Unix time")
        if kind not in RECOVERY_KINDS or source not in RECOVERY_SOURCES:
            raise ValueError(f"recovery kind {kind!r} or source {source!r} unknown")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not (
                math.isfinite(seconds) and 0 <= seconds < 1e7):
            raise ValueError("recovery seconds must be a finite number of seconds")
        if isinstance(lost, bool) or not isinstance(lost, int) or not 0 <= lost < 1 << 63:
            raise ValueError("recovery steps_lost must be a count")
        return cls(kind, source, float(seconds), lost, float(at))


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
    """The worker's metric samples (service.metrics.metric_samples), relayed to /metrics. Checked
    by the relay, not here: a malformed snapshot costs its metrics, never the heartbeat."""
    io_bytes: int = 0
    """Checkpoint bytes this process has read and written so far: progress inside a long
    load or save, which the supervisor counts as liveness."""
    started: float = 0.0
    """When this worker process started (Unix time). With node and pid it names one process:
    pods have PID namespaces of their own, so pids repeat across pods and container restarts."""
    recovery: dict | None = None
    """Rank 0 after a restart: what it cost (service.train.restart_cost.Recovery.as_dict())."""
    compute_s: float = 0.0
    """Running mean of this rank's own compute per step (service.train.step_timer): the
    supervisor compares ranks with it (stragglers). 0: not measured yet."""
    comm_s: float = 0.0
    """Running mean of this rank's gradient all-reduce per step, waiting for peers included
    (service.train.step_timer): a straggler's peers wait, so theirs is the long one."""
    suspect_nodes: list = field(default_factory=list)
    """Nodes this worker's replica checks found holding a copy the majority disagrees with
    (service.train.replicas), since it started: the supervisor may leave them out."""
    agent: str = ""
    """The torchrun agent that started this worker, as "pid@start time": a node whose agent
    outlived a silence was cut off, not lost (a new node's agent is another process)."""

    @property
    def process(self) -> tuple[str, int, float]:
        return (self.node, self.pid, self.started)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Heartbeat":
        """Parse and validate a heartbeat; ValueError on anything a worker cannot have sent.

        Every field is checked at the door: a pid or rank that no worker can have (pid -1 or
        0, rank -1) would otherwise flow into exit orders and kill lists, and a non-finite
        number into process identities that never compare equal."""
        try:
            body = json.loads(data)
        except RecursionError:
            raise ValueError("nested too deeply") from None
        if not isinstance(body, dict):
            raise ValueError("a heartbeat is a JSON object")
        committed = body.get("last_committed_step")
        hb = cls(
            rank=_int(body, "rank"), local_rank=_int(body, "local_rank"), node=_str(body, "node"),
            pid=_int(body, "pid"), world_size=_int(body, "world_size"), step=_int(body, "step"),
            phase=_str(body, "phase"),
            last_committed_step=None if committed is None else _int(body, "last_committed_step"),
            restart_count=_int(body, "restart_count", 0), time=_float(body, "time"),
            metrics=body.get("metrics") or [], started=_float(body, "started", 0.0),
            io_bytes=_int(body, "io_bytes", 0), recovery=_recovery(body.get("recovery")),
            compute_s=_float(body, "compute_s", 0.0), comm_s=_float(body, "comm_s", 0.0),
            suspect_nodes=_names(body.get("suspect_nodes")), agent=str(body.get("agent") or "")[:64],
        )
        hb.validate()
        return hb

    def validate(self) -> None:
        """ValueError unless every field is one a real worker process can report."""
        if self.phase not in PHASES:
            raise ValueError(f"unknown phase {self.phase!r}")
        if self.pid <= 1:
            raise ValueError(f"pid {self.pid} is no worker's")
        if not 1 <= self.world_size <= MAX_WORLD_SIZE:
            raise ValueError(f"world_size {self.world_size} out of range 1..{MAX_WORLD_SIZE}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside the world of {self.world_size}")
        if not 0 <= self.local_rank < MAX_WORLD_SIZE:
            raise ValueError(f"local_rank {self.local_rank} out of range")
        for name in ("step", "restart_count", "io_bytes"):
            if not 0 <= getattr(self, name) < MAX_COUNT:
                raise ValueError(f"{name} {getattr(self, name)} out of range")
        if self.last_committed_step is not None and not 0 <= self.last_committed_step < MAX_COUNT:
            raise ValueError(f"last_committed_step {self.last_committed_step} out of range")
        if not self.node or len(self.node) > 253:
            raise ValueError("node must be a non-empty name of at most 253 characters")
        if not (math.isfinite(self.time) and math.isfinite(self.started) and self.started >= 0):
            raise ValueError("time and started must be finite (started >= 0)")
        for name in ("compute_s", "comm_s"):
            if not (math.isfinite(getattr(self, name)) and 0 <= getattr(self, name) < MAX_COUNT):
                raise ValueError(f"{name} must be finite and >= 0")


def _names(value: object) -> list:
    """A list of node names, as a worker sends it (at most MAX_SUSPECTS names, each non-empty)."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_SUSPECTS or not all(
            isinstance(v, str) and 0 < len(v) <= 253 for v in value):
        raise ValueError(f"suspect_nodes must be a list of at most {MAX_SUSPECTS} node names")
    return list(value)


# Bounds of what a real worker reports (no job has a million ranks, or 2**63 steps or bytes).
MAX_WORLD_SIZE = 1 << 20
MAX_SUSPECTS = 64
MAX_COUNT = 1 << 63


def _int(body: dict, key: str, default: int | None = None) -> int:
    value = body.get(key, default) if default is not None else body[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, not {type(value).__name__}")
    return value


def _float(body: dict, key: str, default: float | None = None) -> float:
    value = body.get(key, default) if default is not None else body[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, not {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{key} out of range") from None


def _recovery(value: object) -> dict | None:
    return None if value is None else Recovery.from_dict(value).as_dict()


def _str(body: dict, key: str) -> str:
    value = body[key]
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, not {type(value).__name__}")
    return value


def shared_token(configured: str | None, launch: LaunchEnv) -> str | None:
    """The job's shared secret: ``supervisor.token``, else FTDIFF_TOKEN (how the local launcher
    and the deploy manifests hand it over). One rule for workers and supervisors alike."""
    return configured or launch.token


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
        protected_pids: tuple[int, ...] = (),
    ):
        """``watch_pids``: processes this worker must not outlive (the local supervisor and
        its torchrun agent): when one is gone, the worker exits at its next interval.
        ``protected_pids``: never ended as a stuck peer whatever the answer says (its agent)."""
        self.url = url.rstrip("/") + "/heartbeat"
        self.token, self.interval_s, self.status = token, interval_s, status
        self.on_exit_order = on_exit_order or exit_for_restart
        self.watch_pids = list(watch_pids or [])
        self.protected_pids = (*protected_pids, *self.watch_pids)
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
        if not isinstance(answer, dict):
            raise ValueError(f"unexpected answer from the supervisor: {answer!r:.80}")
        action = answer.get("action") if obey else None
        if action == "exit":  # addressed to this very process (by pid)
            named = answer.get("kill")
            kill = [p for p in named if safe_to_kill(p, self.protected_pids)] if isinstance(named, list) else []
            if named and len(kill) != len(named):
                log.error("ignoring pids %s named as stuck peers: not single other processes",
                          [p for p in named if p not in kill])
            generation = answer.get("generation", 0)
            self.on_exit_order(generation if isinstance(generation, int) else 0, kill)

    def _run(self) -> None:
        while not self._stop.is_set():
            gone = [pid for pid in self.watch_pids if not pid_alive(pid)]
            if gone:
                exit_orphaned(gone)
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
