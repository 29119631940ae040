"""The node's warm process ("zygote"): torch, diffusers and the training code imported once,
a worker forked from it on demand — keeps Python start-up and ~4 s of imports off every
(re)start of a worker.

``python -m service.node.zygote --socket PATH`` imports the heavy modules, then serves a unix
socket. Each request comes from a shim (``service.node.shim``, what torchrun starts in place of
``python -m service.train``): its argv, environment, working directory and stdin/stdout/stderr.
The zygote forks a child that becomes that worker and runs ``service.train.entry.main``,
answers the child's pid, and, when the child ends, its raw wait status.

Fork safety. The zygote imports and does nothing else: no torch op (the OpenMP/MKL pools start
at the first parallel op, and a pool copied by fork is dead in the child), no process group, no
Python thread (checked: it refuses to serve if one runs). numpy's and scipy's OpenBLAS start
server threads when loaded; OpenBLAS stops them in its pthread_atfork handler, so after the first
fork the zygote is a single thread (tests/integration/test_zygote.py checks it). Settings read at
start-up or import (PYTHONPATH, OMP_NUM_THREADS, ... see ``shim.STARTUP_ENV``), the interpreter,
the checkout and ``sys.flags.optimize`` must be the same as the shim's, else the request is
refused and the shim starts the worker the slow way. Nothing is re-seeded: the training code
seeds everything itself from the config.

Lifetimes. A child never outlives the zygote (PR_SET_PDEATHSIG, SIGKILL) nor its shim (the
zygote SIGKILLs the child's process group when the shim's connection closes: the shim was
killed, even by SIGKILL). SIGTERM/SIGINT to the zygote stop new forks; it leaves once its
children are gone (so a stop signal that reaches every process of a node still lets the workers
commit their emergency checkpoint). The zygote should die with whatever started it: the local
launcher gives it PR_SET_PDEATHSIG; in a pod it dies with the pod.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import io
import json
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from service.launch_env import worker_agent_env
from service.node import shim as wire
from service.node.exits import exit_process
from service.node.proc import die_with_parent

log = logging.getLogger("service.node.zygote")  # also when run as __main__

# What a worker imports, including the parts it imports lazily (found by diffing sys.modules
# of a finished worker against these): nothing heavy is left for the forked worker to import.
WARM_MODULES = (
    "torch", "torch.distributed", "torch.distributed.checkpoint", "torch.nn.parallel",
    "torch.distributed.elastic.multiprocessing.errors", "torch.utils.serialization", "diffusers",
    "diffusers.training_utils", "fsspec.implementations.local", "service.dist", "service.logs",
    "service.heartbeat", "service.models.build", "service.train.loop", "service.train.entry",
)
# Blocked around fork: a signal forwarded by the shim between the fork and the child's reset of
# the zygote's handlers stays pending and is then delivered to the worker, not to a copy of
# the zygote's handler.
BLOCKED = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP}
REQUEST_TIMEOUT_S = 10.0
DEFAULT_ENTRY = "service.train.entry:main"
_UCRED = struct.Struct("3i")


def warm_up(modules: tuple[str, ...] = WARM_MODULES) -> float:
    """Import ``modules``; seconds taken. Raises if that left a Python thread running."""
    t0 = time.monotonic()
    for name in modules:
        importlib.import_module(name)
    if threading.active_count() != 1:
        names = [t.name for t in threading.enumerate()]
        raise RuntimeError(f"importing the worker started Python threads {names}: "
                           "forking would copy them dead")
    # Imported objects never die: keep the collector (and its writes) off them in every child.
    gc.freeze()
    return time.monotonic() - t0


@dataclass
class Job:
    """What a forked child becomes: the shim's request and its descriptors."""

    request: dict[str, Any]
    fds: list[int]
    zygote: int


@dataclass
class _Child:
    pid: int
    pidfd: int
    conn: socket.socket | None
    started: float = field(default_factory=time.monotonic)


class Zygote:
    def __init__(self, path: str, env: dict[str, str] | None = None, path0: list[str] | None = None):
        self.path = path
        # The start-up settings everything was imported under (before any import ran).
        self.env0 = dict(os.environ if env is None else env)
        self.sys_path0 = list(sys.path if path0 is None else path0)
        self.sel = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.children: dict[int, _Child] = {}
        self.stopping = False

    # -- the loop --------------------------------------------------------------------------------
    def serve(self) -> Job | None:
        """Serve until stopped and childless: None. In a forked child: the Job to become."""
        self._listen()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        log.info("warm process %d serving %s", os.getpid(), self.path)
        while not (self.stopping and not self.children):
            if self.stopping and self.listener is not None:
                self._close_listener()
            for key, _ in self.sel.select(timeout=0.5):
                kind, obj = key.data
                if kind == "listen":
                    job = self._accept()
                    if job is not None:
                        return job
                elif kind == "conn":
                    self._on_conn(obj)
                else:
                    self._reap(obj)
        self._close_listener()
        self.sel.close()
        return None

    def _on_stop(self, signum: int, _frame: object) -> None:
        self.stopping = True

    def _listen(self) -> None:
        # Bind under a temporary name, then rename: the socket's path appears only when it
        # accepts, so "the path exists" means "ready" (the launcher waits for that).
        tmp = f"{self.path}.{os.getpid()}.tmp"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)  # only this user may connect (and the peer's uid is checked too)
        try:
            sock.bind(tmp)
        finally:
            os.umask(old)
        sock.listen(64)
        os.replace(tmp, self.path)
        sock.setblocking(False)
        self.listener = sock
        self.sel.register(sock, selectors.EVENT_READ, ("listen", sock))

    def _close_listener(self) -> None:
        if self.listener is None:
            return
        self.sel.unregister(self.listener)
        self.listener.close()
        self.listener = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # -- one request -----------------------------------------------------------------------------
    def _accept(self) -> Job | None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return None
        conn.setblocking(True)
        conn.settimeout(REQUEST_TIMEOUT_S)
        try:
            cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            _pid, uid, _gid = _UCRED.unpack(cred)
            if uid != os.getuid():
                log.warning("refused a request from uid %d", uid)
                conn.close()
                return None
            req, fds = wire.recv_request(conn)
        except (OSError, ValueError) as e:
            log.warning("bad request: %s", e)
            conn.close()
            return None
        problem = self.incompatible(req)
        if problem:
            log.warning("refusing a worker: %s", problem)
            for fd in fds:
                os.close(fd)
            _answer(conn, {"refused": problem})
            conn.close()
            return None
        return self._fork(conn, req, fds)

    def incompatible(self, req: dict[str, Any]) -> str | None:
        """Why a worker forked from here would not be the worker the shim would start, or None.
        Names only, never values: the environment carries secrets."""
        if os.path.realpath(req.get("executable", "")) != os.path.realpath(sys.executable):
            return "another Python interpreter"
        if req.get("code") != wire.code_dir():
            return "another checkout of ftdiff"
        if req.get("optimize") != sys.flags.optimize:
            return "another python -O level"
        mine, theirs = wire.startup_env(self.env0), wire.startup_env(req.get("env", {}))
        differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        if differ:
            return "start-up settings differ: " + ", ".join(differ)
        if list(req.get("path", []))[1:] != self.sys_path0[1:]:  # [0]: the directory started in
            return "another sys.path"
        return None

    def _fork(self, conn: socket.socket, req: dict[str, Any], fds: list[int]) -> Job | None:
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED)
        try:
            pid = os.fork()
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            log.error("fork failed: %s", e)
            _answer(conn, {"refused": f"fork failed ({e})"})
            conn.close()
            for fd in fds:
                os.close(fd)
            return None
        if pid == 0:  # the child: drop every descriptor of the zygote's own
            conn.close()
            self._close_inherited()
            return Job(req, fds, os.getppid())
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        child = _Child(pid, pidfd, conn)
        self.children[pid] = child
        self.sel.register(pidfd, selectors.EVENT_READ, ("pidfd", child))
        conn.setblocking(True)
        conn.settimeout(None)
        try:
            _answer(conn, {"pid": pid})
        except OSError:  # the shim is already gone
            self._shim_gone(child)
            return None
        self.sel.register(conn, selectors.EVENT_READ, ("conn", child))
        log.debug("forked worker %d", pid)
        return None

    def _on_conn(self, child: _Child) -> None:
        assert child.conn is not None
        try:
            data = child.conn.recv(4096)
        except OSError:
            data = b""
        if not data:  # the shim is gone, however it died: so goes its worker
            self._shim_gone(child)

    def _shim_gone(self, child: _Child) -> None:
        if child.conn is not None:
            try:
                self.sel.unregister(child.conn)
            except KeyError:
                pass
            child.conn.close()
            child.conn = None
        if child.pid in self.children:  # not reaped yet, so the pid cannot have been reused
            log.warning("shim of worker %d is gone: killing the worker", child.pid)
            for kill in (os.killpg, os.kill):  # its group (after setsid), else itself
                try:
                    kill(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue

    def _reap(self, child: _Child) -> None:
        _, status = os.waitpid(child.pid, 0)
        self.sel.unregister(child.pidfd)
        os.close(child.pidfd)
        del self.children[child.pid]
        log.debug("worker %d ended (status %d) after %.1fs",
                  child.pid, status, time.monotonic() - child.started)
        if child.conn is not None:
            try:
                _answer(child.conn, {"status": status})
            except OSError:
                pass
            self.sel.unregister(child.conn)
            child.conn.close()
            child.conn = None

    def _close_inherited(self) -> None:
        for child in self.children.values():
            os.close(child.pidfd)
            if child.conn is not None:
                child.conn.close()
        if self.listener is not None:
            self.listener.close()  # the socket file stays: it is the zygote's
        self.sel.close()
        self.children = {}


def _answer(conn: socket.socket, body: dict[str, Any]) -> None:
    conn.sendall(json.dumps(body).encode() + b"\n")


# -- in the forked child ------------------------------------------------------------------------
def become_worker(job: Job, entry: str = DEFAULT_ENTRY) -> int:
    """Turn this forked child into the shim's worker, then run ``entry`` (``module:function``,
    called with the argv after the program name); its exit code."""
    os.setsid()  # a session and process group of its own, as torchrun gives its workers
    die_with_parent()
    if os.getppid() != job.zygote:  # the zygote died before the line above took effect
        os.kill(os.getpid(), signal.SIGKILL)
    req = job.request
    for name in ("stdout", "stderr"):  # anything of the zygote's still buffered stays its own
        getattr(sys, name).flush()
    for target, fd in enumerate(job.fds):
        os.dup2(fd, target)
        if fd > 2:
            os.close(fd)
    _reopen_stdio(bool(req.get("unbuffered")))
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    # Its agent is the shim's parent, not the zygote (see launch_env.WORKER_AGENT_ENV).
    os.environ.update(worker_agent_env(os.getpid(), int(req["parent"])))
    sys.argv[:] = req["argv"]
    sys.path[:] = req["path"]
    root = logging.getLogger()  # a fresh interpreter has no handlers; the worker sets its own
    root.handlers.clear()
    root.setLevel(logging.WARNING)
    log.setLevel(logging.NOTSET)
    signal.set_wakeup_fd(-1)
    for sig in BLOCKED | {signal.SIGCHLD}:  # Python's start-up dispositions
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())  # pending forwarded signals land now
    module, _, function = entry.partition(":")
    return int(getattr(importlib.import_module(module), function)(sys.argv[1:]))


def _reopen_stdio(unbuffered: bool) -> None:
    """sys.std* on the shim's descriptors, buffered as the shim's were (torchrun runs ``-u``)."""
    encoding, errors = sys.stdout.encoding, sys.stdout.errors
    stdin = io.BufferedReader(io.FileIO(0, "r", closefd=False))
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(stdin, encoding=encoding)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        raw = io.FileIO(fd, "w", closefd=False)
        stream = io.TextIOWrapper(
            raw if unbuffered else io.BufferedWriter(raw), encoding=encoding,  # type: ignore[arg-type]
            errors="backslashreplace" if name == "stderr" else errors,
            line_buffering=not unbuffered and (name == "stderr" or os.isatty(fd)), write_through=unbuffered,
        )
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.node.zygote", description=__doc__.splitlines()[0])
    p.add_argument("--socket", required=True,
                   help="unix socket path to serve (FTDIFF_ZYGOTE_SOCKET of the shims)")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--entry", default=DEFAULT_ENTRY, metavar="MODULE:FUNCTION",
                   help="what a forked worker runs, with its argv after the program name "
                        "(tests use a tiny one)")
    args = p.parse_args(argv)
    env0, path0 = dict(os.environ), list(sys.path)
    from service.logs import setup_logging

    setup_logging("zygote", args.log_format)
    log.setLevel(logging.INFO)
    module = args.entry.partition(":")[0]
    seconds = warm_up(WARM_MODULES + (module,))
    log.info("imported the worker in %.1fs (%d modules)", seconds, len(sys.modules))
    job = Zygote(args.socket, env0, path0).serve()
    if job is None:
        return 0
    exit_process(lambda: become_worker(job, args.entry))  # a forked worker leaves without finalizing


if __name__ == "__main__":
    sys.exit(main())
