"""An HTTP proxy in front of a test S3 endpoint that plays a misbehaving store: it can drop
request headers (a gateway that ignores conditional writes) or, from a moment on, answer every
request with an S3 error (credentials revoked, bucket policy changed) — real HTTP both ways.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass
class ProxyControl:
    """What the proxy does; tests change it while clients talk through it."""

    drop_headers: frozenset[str] = frozenset()
    # (status, S3 error code): every request (of fail_methods, if set) is answered with it
    # instead of being forwarded.
    fail_with: tuple[int, str] | None = None
    fail_methods: frozenset[str] | None = None
    requests: int = 0
    failed: int = 0
    seen: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of every request
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(upstream: str, control: ProxyControl) -> type[BaseHTTPRequestHandler]:
    target = urlsplit(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet: the suite's output is the tests'
            pass

        def _relay(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with control.lock:
                control.requests += 1
                control.seen.append((self.command, self.path))
                failing = control.fail_with
                if control.fail_methods is not None and self.command not in control.fail_methods:
                    failing = None
            if failing is not None:
                with control.lock:
                    control.failed += 1
                status, code = failing
                payload = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>"
                           f"<Message>{code} (injected by the test proxy)</Message></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                return
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in _HOP_BY_HOP and k.lower() not in control.drop_headers}
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
            finally:
                conn.close()
            self.send_response(answer.status, answer.reason)
            for k, v in answer.getheaders():
                if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

    return Handler


@contextmanager
def s3_http_proxy(upstream: str, control: ProxyControl | None = None) -> Iterator[tuple[str, ProxyControl]]:
    """Serve the proxy on a free loopback port; yields (its URL, its control)."""
    control = control or ProxyControl()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(upstream, control))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", control
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
