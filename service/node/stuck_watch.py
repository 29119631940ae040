"""The torchrun agent's hand in attach mode: it ends its node's stuck workers on the
supervisor's word.

`ftdiff supervise` cannot signal workers (other pods, other machines). It orders restarts
through their heartbeats, and a process that cannot heartbeat (SIGSTOPped, wedged) is ended by
a peer on its node on that peer's way out. When every worker of a node is stuck, no peer is
left to do that and the job waits forever. So the agent (``python -m service.node.agent``),
the ancestor of every worker of its node, asks the supervisor every heartbeat interval which
processes of its node are stuck (``POST /stuck``) and SIGKILLs those that are its own
descendants; torchrun then restarts its group as after any crash.

Attach mode only: under ``ftdiff train`` the supervisor kills stuck processes itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from service.config import load_config
from service.heartbeat import shared_token
from service.launch_env import NODE_ENV, LaunchEnv, add_worker_args, overrides_from_env
from service.node.proc import descendants, started_at

log = logging.getLogger(__name__)
# A worker reports its start time from its own clock, after its imports; /proc's is the fork.
CLOCK_SLACK_S = 2.0


@dataclass(frozen=True)
class WatchSettings:
    url: str  # the supervisor's base URL
    token: str
    interval_s: float


def watch_settings(training_args: list[str], launch: LaunchEnv) -> WatchSettings | None:
    """Where the workers report, from their own command line and environment (their config,
    FTDIFF_OVERRIDES, FTDIFF_SUPERVISOR_URL, FTDIFF_TOKEN); None when they report to no
    supervisor, under ``ftdiff train``, or when their config does not load (they say why)."""
    if launch.under_local_supervisor:  # the supervisor kills by itself
        return None
    parser = argparse.ArgumentParser(add_help=False)
    add_worker_args(parser)
    try:
        args, _ = parser.parse_known_args(training_args)
        cfg = load_config(args.config, overrides_from_env() + list(args.set))
    except (SystemExit, Exception) as e:  # noqa: BLE001 — the workers report their config errors
        log.debug("agent: no stuck-worker watch (the workers' config: %s)", type(e).__name__)
        return None
    url = launch.supervisor_url or cfg.supervisor.url
    token = shared_token(cfg.supervisor.token, launch)
    if not url or not token:
        return None
    return WatchSettings(url.rstrip("/"), token, cfg.supervisor.heartbeat_interval_s)


def node_of(pid: int) -> str | None:
    """The node a worker reports as (service.dist: FTDIFF_NODE, else torchrun's GROUP_RANK),
    read from its environment."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    env = dict(item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    value = env.get(NODE_ENV.encode()) or env.get(b"GROUP_RANK")
    return value.decode(errors="replace") if value else None


class StuckWatch:
    def __init__(self, settings: WatchSettings):
        self.settings = settings
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stuck-watch", daemon=True)

    def start(self) -> StuckWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def check_once(self) -> list[int]:
        """Ask about each node this agent's workers report as; SIGKILL the stuck ones that are
        this agent's descendants and started no later than the stuck process said it did (a
        later process that got its pid is left alone) — never anything else, whatever the
        answer names. The pids ended."""
        mine = descendants(os.getpid())
        nodes = {n for n in (node_of(pid) for pid in mine) if n is not None}
        ended = []
        for node in sorted(nodes):
            for pid, started in self._stuck(node):
                began = started_at(pid)
                if pid in mine and began is not None and (started <= 0 or began <= started + CLOCK_SLACK_S):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    log.error("agent: ended worker process %d (node %s): the supervisor found it stuck", pid, node)
                    ended.append(pid)
        return ended

    def _stuck(self, node: str) -> list[tuple[int, float]]:
        request = urllib.request.Request(
            f"{self.settings.url}/stuck", data=json.dumps({"node": node}).encode(), method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.settings.token}"})
        with urllib.request.urlopen(request, timeout=max(0.5, self.settings.interval_s)) as response:
            answer = json.loads(response.read() or b"{}")
        named = answer.get("stuck") if isinstance(answer, dict) else None
        if not isinstance(named, list):
            raise ValueError(f"unexpected answer from the supervisor: {answer!r:.80}")
        return [(p[0], float(p[1])) for p in named
                if isinstance(p, list) and len(p) == 2 and type(p[0]) is int and p[0] > 1
                and type(p[1]) in (int, float) and p[1] == p[1]]

    def _run(self) -> None:
        while not self._stop.wait(self.settings.interval_s):
            try:
                self.check_once()
            except Exception as e:  # noqa: BLE001 — any bad answer or outage: ask again next time
                self.failed += 1
                if self.failed in (1, 10, 100):  # say so, without flooding the log
                    log.warning("agent: asking %s/stuck failed (%s); the job goes on", self.settings.url, e)
