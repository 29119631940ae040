"""A loopback TCP forwarder that a test can cut (refuse + reset every connection), restore,
or slow down (``delay_s``: latency added to every request).

Used to take the S3 endpoint away from a running job for real, at the network level.
"""

from __future__ import annotations

import socket
import threading
import time

# Bytes from a client after this much quiet start a new request (and pay the latency again); with
# ``every_request``, so do bytes sent once the server has answered since the client last sent
# (HTTP/1.1 sends a request, then waits): requests sent back to back each pay it too.
REQUEST_GAP_S = 0.02


class TcpProxy:
    def __init__(self, upstream_port: int, host: str = "127.0.0.1", every_request: bool = False):
        self.host, self.upstream_port = host, upstream_port
        self.every_request = every_request
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.delay_s = 0.0  # added before each request a client sends (throttled storage)

    def __enter__(self) -> "TcpProxy":
        self.restore()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cut()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        self.port = listener.getsockname()[1]
        listener.listen(64)
        self._listener = listener
        t = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        t.start()
        self._threads.append(t)

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            try:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                c.close()  # linger 0: the peer sees a reset, like a dropped link
            except OSError:
                pass

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(100_000):  # bounded: a test never needs more connections
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((self.host, self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, upstream}
            answered = threading.Event()  # the server sent something since the client last did
            for a, b, slow in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(a, b, answered, slow), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, answered: threading.Event, slow: bool) -> None:
        last = 0.0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not slow:
                    answered.set()
                else:
                    new_request = (self.every_request and answered.is_set()
                                   or time.monotonic() - last > REQUEST_GAP_S)
                    if self.delay_s and new_request:
                        time.sleep(self.delay_s)
                    answered.clear()
                last = time.monotonic()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
