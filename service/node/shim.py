"""The thin worker torchrun starts when workers are pre-started: it gets its worker from the
node's warm process (``service.node.zygote``) instead of importing torch itself.

``python -m service.node.shim ARGS`` takes the place of ``python -m service.train ARGS``. It
sends its argv, environment, working directory and stdin/stdout/stderr (SCM_RIGHTS) to the
zygote's unix socket (``FTDIFF_ZYGOTE_SOCKET``), which forks a worker that runs
``service.train.entry.main`` with them. The shim then stands in for that worker towards torchrun:

- SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 are forwarded to the worker's process group (torchrun
  signals the group of the process it started; the worker leads a session of its own, as
  torchrun's workers do);
- it exits with the worker's exit code, or kills itself with the signal that killed the worker
  (torchrun then reports e.g. ``-9`` for a ``kill -9`` of the worker);
- if the shim dies, even by SIGKILL (torchrun's escalation), the zygote sees its connection
  close and SIGKILLs the worker's process group; if the zygote dies, its workers die with it
  (PR_SET_PDEATHSIG) and the shim dies by SIGKILL too.

No zygote (variable unset, socket missing, refused, or a zygote whose start-up environment
differs from the shim's): the shim ``exec``s ``python -m service.train`` with the same
arguments in the same process, so it always works under plain torchrun (invariant 5).

This module must stay light: it imports only the standard library and ftdiff's stdlib-only
``launch_env`` and ``node.proc`` (``python -X importtime -m service.node.shim`` shows no torch),
since its start-up is on the recovery path.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
from collections.abc import Mapping
from typing import Any, NoReturn

from service.launch_env import LaunchEnv
from service.node.proc import die_with_parent

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
# Settings a Python process (or a library it loads: libgomp, MKL, torch's C++ logging) reads
# once at start-up or import. A zygote imported everything under its own values, so it serves
# only shims whose values are the same; otherwise the shim starts the worker the slow way.
STARTUP_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONHASHSEED", "PYTHONSAFEPATH", "PYTHONNOUSERSITE",
               "PYTHONOPTIMIZE", "PYTHONWARNINGS", "LD_PRELOAD", "LD_LIBRARY_PATH",
               "TORCH_CPP_LOG_LEVEL", "TORCH_SHOW_CPP_STACKTRACES",
               "TORCH_LOGS", "LOGLEVEL")  # LOGLEVEL: torch.distributed.elastic's loggers
STARTUP_ENV_PREFIXES = ("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_")
_HEADER = struct.Struct(">I")
_MAX_REQUEST = 16 << 20


# -- the wire format (the zygote imports these) ----------------------------------------------------
def startup_env(env: Mapping[str, str]) -> dict[str, str]:
    """The part of an environment that must match the zygote's (see STARTUP_ENV)."""
    return {k: v for k, v in env.items() if k in STARTUP_ENV or k.startswith(STARTUP_ENV_PREFIXES)}


def code_dir() -> str:
    """Where this ``service`` package is: a zygote of another checkout must not serve us."""
    import service

    return os.path.realpath(os.path.dirname(service.__file__))


def pack(body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return _HEADER.pack(len(data)) + data


def recv_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One length-prefixed JSON request and the descriptors sent with its first bytes."""
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
    try:
        while len(data) < _HEADER.size or len(data) < _HEADER.size + _HEADER.unpack_from(data)[0]:
            if len(data) >= _HEADER.size and _HEADER.unpack_from(data)[0] > _MAX_REQUEST:
                raise ValueError("request too large")
            more = conn.recv(1 << 16)
            if not more:
                raise ConnectionError("connection closed inside a request")
            data += more
        return json.loads(data[_HEADER.size:]), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def request(argv: list[str]) -> dict[str, Any]:
    """What the forked worker needs to be this process's double."""
    return {
        "argv": argv, "env": dict(os.environ), "cwd": os.getcwd(), "path": sys.path,
        "executable": sys.executable, "code": code_dir(), "parent": os.getppid(),
        # -u (torchrun runs workers so) or PYTHONUNBUFFERED: the forked worker writes through too.
        "unbuffered": bool(getattr(sys.stdout, "write_through", False)), "optimize": sys.flags.optimize,
    }


# -- the shim --------------------------------------------------------------------------------------
class _Forwarder:
    """Signals that arrive before the worker's pid is known wait here, then follow it."""

    def __init__(self) -> None:
        self.child: int | None = None
        self.pending: list[int] = []
        for sig in FORWARDED:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.child is None:
            self.pending.append(signum)
        else:
            _signal_group(self.child, signum)

    def attach(self, child: int) -> None:
        self.child = child
        for signum in self.pending:
            _signal_group(child, signum)
        self.pending.clear()


def _signal_group(pid: int, signum: int) -> None:
    # Like torchrun's own killpg of a worker's group: the worker's data loader processes get it
    # too. Before the worker has called setsid its group does not exist yet: signal it alone
    # (the zygote forks with these signals blocked, so none is lost in between).
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _std_fds() -> list[int]:
    """0, 1 and 2, opened on /dev/null where the shim was started without them."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:  # lower ones exist, so the lowest free number is fd itself
                os.dup2(opened, fd)
                os.close(opened)
    return [0, 1, 2]


def _connect(path: str | None) -> socket.socket | None:
    if not path:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return sock


def _send(sock: socket.socket, payload: bytes, fds: list[int]) -> None:
    sent = socket.send_fds(sock, [payload], fds)
    if sent < len(payload):  # interrupted part-way (a signal): the rest goes without descriptors
        sock.sendall(payload[sent:])


def _lines(sock: socket.socket):  # type: ignore[no-untyped-def]
    """The zygote's answers, one JSON object per line, until it closes the connection."""
    buf = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield json.loads(line)


def die_like(status: int) -> NoReturn:
    """Exit as the worker did: its exit code, or death by the same signal."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        os._exit(code)
    sig = -code
    if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be caught or blocked
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)  # a signal whose default is not to terminate


def fallback(forwarder: _Forwarder | None = None, why: str = "") -> NoReturn:
    """Become ``python -m service.train`` with the same arguments (and the same pid)."""
    if why:
        print(f"ftdiff shim: {why}; starting the worker without the warm process",
              file=sys.stderr, flush=True)
    for sig in FORWARDED:
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    if forwarder is not None and forwarder.pending:  # asked to stop before anything started
        die_like(forwarder.pending[0])  # a raw status: the signal number is the termsig
    orig = list(sys.orig_argv)
    try:
        at = orig.index("-m")
        argv = orig[:at] + ["-m", "service.train"] + sys.argv[1:]
    except ValueError:
        argv = [sys.executable, "-m", "service.train"] + sys.argv[1:]
    os.execv(sys.executable, argv)


def main() -> NoReturn:
    launch = LaunchEnv.read()
    if launch.under_local_supervisor:
        # Go when the torchrun agent goes (as the worker would); the zygote then ends the
        # worker, because this end of its connection closes.
        die_with_parent()
    forwarder = _Forwarder()
    path = launch.zygote_socket
    sock = _connect(path)
    if sock is None:
        fallback(forwarder, f"no warm process at {path}" if path else "")
    try:
        _send(sock, pack(request(sys.argv)), _std_fds())
        answers = _lines(sock)
        first = next(answers, None)
    except OSError as e:
        sock.close()
        fallback(forwarder, f"the warm process failed ({e})")
    if first is None or "pid" not in first:
        sock.close()
        why = (first or {}).get("refused", "closed the connection")
        fallback(forwarder, f"the warm process refused ({why})")
    child = int(first["pid"])
    forwarder.attach(child)
    # The connection stays open for the worker's whole life: its end is how the zygote learns
    # that this shim is gone.
    for answer in answers:
        if "status" in answer:
            die_like(int(answer["status"]))
    # The zygote died: its workers die with it (PR_SET_PDEATHSIG); make sure, then report the
    # worker as killed, which is what happened to it.
    _signal_group(child, signal.SIGKILL)
    die_like(signal.SIGKILL)


if __name__ == "__main__":
    main()
