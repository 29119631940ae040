"""The supervisor's HTTP endpoints: heartbeats in, restart orders out, /metrics, health.

``POST /heartbeat``, ``POST /stuck`` (a torchrun agent asks which of its node's processes are
stuck, to end them) and ``POST /control/restart`` need ``Authorization: Bearer <token>``;
anything else on them is refused (401) and counted. ``GET /metrics``, ``/healthz`` and
``/readyz`` are open, like any Prometheus target: they reveal no secrets. The default bind
address is loopback; binding wider is an explicit choice in the config. When ``metrics.host``/
``metrics.port`` differ from the supervisor's own address, a second server answers there with
the open endpoints only (``SupervisorEndpoints``): exposing metrics wider never exposes control.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.config import Config
from service.heartbeat import Heartbeat, token_ok
from service.metrics import SupervisorMetrics
from service.supervisor.monitor import JobMonitor

log = logging.getLogger(__name__)
MAX_BODY = 64 * 1024
# Seconds a connection may sit idle or trickle its request: a thread serves each connection,
# so one that never finishes must not hold its thread forever.
REQUEST_TIMEOUT_S = 10.0


def _node_of(body: bytes) -> str | None:
    """The node named by a ``POST /stuck`` body, or None when it is not one."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
        return None
    node = data.get("node") if isinstance(data, dict) else None
    return node if isinstance(node, str) and 0 < len(node) <= 256 else None


class SupervisorServer:
    def __init__(
        self,
        host: str,
        port: int,
        token: str,
        monitor: JobMonitor,
        metrics: SupervisorMetrics,
        on_restart_observed: Callable[[Heartbeat], None] | None = None,
        on_restart_requested: Callable[[], None] | None = None,
        on_heartbeat: Callable[[Heartbeat], None] | None = None,
        ready: Callable[[], bool] | None = None,
        known_nodes: set[str] | None = None,
        control: bool = True,
    ):
        self.token, self.monitor, self.metrics = token, monitor, metrics
        self.control = control  # False: only /metrics, /healthz, /readyz
        self.on_restart_observed = on_restart_observed or (lambda hb: None)
        self.on_restart_requested = on_restart_requested or (lambda: None)
        self.on_heartbeat = on_heartbeat or (lambda hb: None)
        self.ready = ready or (lambda: True)
        self.known_nodes = known_nodes  # local mode: heartbeats from other nodes are refused
        self._metrics_warned: set[int] = set()  # ranks whose bad snapshots were logged
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = REQUEST_TIMEOUT_S  # on the socket: idle and trickling clients time out

            def log_message(self, fmt: str, *args: object) -> None:  # keep access logs quiet
                log.debug("%s " + fmt, self.address_string(), *args)

            def _reply(self, code: int, body: bytes, content_type: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                try:
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # e.g. a health probe that took
                    log.debug("client left before the answer")  # the status and hung up

            def _refuse(self, code: int, why: str) -> None:
                server.metrics.rejected.inc()
                self._reply(code, json.dumps({"error": why}).encode())

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path == "/metrics":
                    try:
                        text = generate_latest(server.metrics.exported)
                    except Exception as e:  # never a dropped connection: say why, in the log too
                        log.exception("rendering /metrics failed")
                        self._reply(500, json.dumps({"error": f"{type(e).__name__}: {e}"[:300]}).encode())
                        return
                    self._reply(200, text, CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    self._reply(200, b'{"status": "ok"}')
                elif self.path == "/readyz":
                    ok = server.ready()
                    self._reply(200 if ok else 503, json.dumps({"ready": ok}).encode())
                else:
                    self._reply(404, b'{"error": "not found"}')

            def do_POST(self) -> None:  # noqa: N802
                if not server.control or self.path not in ("/heartbeat", "/stuck", "/control/restart"):
                    self._reply(404, b'{"error": "not found"}')
                    return
                if not token_ok(self.headers.get("Authorization"), server.token):
                    self._refuse(401, "missing or wrong token")
                    return
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    self.close_connection = True  # where the body ends is unknown
                    self._refuse(400, "bad Content-Length")
                    return
                if not 0 <= length <= MAX_BODY:
                    self.close_connection = True
                    self._refuse(413 if length > MAX_BODY else 400, "bad Content-Length: 0 to 65536 bytes")
                    return
                try:
                    body = self.rfile.read(length)
                except OSError:  # timed out or reset mid-body: nobody is left to answer
                    server.metrics.rejected.inc()
                    self.close_connection = True
                    return
                if self.path == "/control/restart":
                    server.on_restart_requested()
                    self._reply(200, json.dumps({"generation": server.monitor.generation}).encode())
                    return
                if self.path == "/stuck":
                    node = _node_of(body)
                    if node is None:
                        self._refuse(400, 'bad request: expected {"node": "<node>"}')
                    elif server.known_nodes is not None and node not in server.known_nodes:
                        self._refuse(403, f"unknown node {node!r}")
                    else:
                        stuck = [[pid, started] for pid, started in server.monitor.stuck_on(node)]
                        self._reply(200, json.dumps({"stuck": stuck}).encode())
                    return
                try:
                    hb = Heartbeat.from_json(body)
                except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:
                    self._refuse(400, f"bad heartbeat: {type(e).__name__}: {e}"[:300])
                    return
                if server.known_nodes is not None and hb.node not in server.known_nodes:
                    self._refuse(403, f"unknown node {hb.node!r}")
                    return
                self._reply(200, json.dumps(server.heartbeat(hb)).encode())

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="supervisor-http", daemon=True)

    def heartbeat(self, hb: Heartbeat) -> dict[str, Any]:
        """A valid heartbeat's answer: an exit order for a process told to leave, else none. A
        malformed metrics snapshot is dropped (and counted) and the heartbeat still counts: a
        worker's liveness never depends on its metrics, and /metrics never on one worker."""
        if self.monitor.should_exit(hb):
            self.monitor.reachable(hb)  # ordered out, but back: a partition's survivor perhaps
            kill = self.monitor.kill_list(hb)
            return {"action": "exit", "generation": self.monitor.generation, "kill": kill}
        if self.monitor.observe(hb):
            self.on_restart_observed(hb)
        self.on_heartbeat(hb)
        answer: dict[str, Any] = {"action": "none", "generation": self.monitor.generation}
        if hb.metrics:
            try:
                self.metrics.relay.update(hb.rank, hb.metrics)
            except (ValueError, TypeError) as e:
                self.metrics.rejected.inc()
                answer["metrics"] = f"rejected: {e}"[:300]
                if hb.rank not in self._metrics_warned:  # once per rank, not once per interval
                    self._metrics_warned.add(hb.rank)
                    log.warning("rank %d (node %s) sent a malformed metrics snapshot, not relayed: %s",
                                hb.rank, hb.node, e)
        return answer

    def start(self) -> "SupervisorServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class SupervisorEndpoints:
    """The control server on ``supervisor.host:port`` and, if ``metrics.host:port`` is another
    address, a scrape-only server there; started and stopped together."""

    def __init__(
        self,
        cfg: Config,
        token: str,
        monitor: JobMonitor,
        metrics: SupervisorMetrics,
        ready: Callable[[], bool],
        **control_options: Any,
    ):
        sup = cfg.supervisor
        self.control = SupervisorServer(sup.host, sup.port, token, monitor, metrics, ready=ready,
                                        **control_options)
        self.scrape: SupervisorServer | None = None
        if (cfg.metrics.host, cfg.metrics.port) != (sup.host, self.control.port):
            self.scrape = SupervisorServer(cfg.metrics.host, cfg.metrics.port, token, monitor,
                                           metrics, ready=ready, control=False)

    @property
    def metrics_address(self) -> str:
        server = self.scrape or self.control
        host = server.httpd.server_address[0]
        return f"{host}:{server.port}"

    def start(self) -> "SupervisorEndpoints":
        self.control.start()
        if self.scrape is not None:
            self.scrape.start()
        return self

    def stop(self) -> None:
        try:
            self.control.stop()
        finally:
            if self.scrape is not None:
                self.scrape.stop()
