"""The local supervisor's view of processes (Linux /proc): liveness, children, SIGKILL by pid;
and the per-node warm processes of pre-started workers."""

from __future__ import annotations

import ctypes  # noqa: F401  (imported before any fork: die_with_parent runs in preexec_fn)
import logging
import os
import signal
import subprocess
import sys
import time

from service.node.proc import children, descendants, die_with_parent, pid_alive, stopped

log = logging.getLogger(__name__)
__all__ = ["children", "descendants", "end_tree", "ending_signal", "kill", "pid_alive", "signal_pid", "stopped", "Zygotes"]


def ending_signal(exit_code: int) -> int | None:
    """The signal an agent ended by: killed by it (negative code), or, through
    service.node.agent, ended by it (128 + signal); None for a program's own exit."""
    if exit_code < 0:
        return -exit_code
    return exit_code - 128 if exit_code > 128 else None


def kill(pid: int) -> None:
    """SIGKILL ``pid`` if it still exists."""
    signal_pid(pid, signal.SIGKILL)


def signal_pid(pid: int, sig: int) -> None:
    """Send ``sig`` to ``pid`` if it still exists."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def end_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process (a torchrun agent) and everything it started."""
    started = descendants(proc.pid)  # read while it is still their parent
    proc.kill()  # first, so it cannot start replacements for what is killed next
    for pid in started:
        kill(pid)
    proc.wait(timeout=10)


# -- pre-started workers ------------------------------------------------------------------------
# By name, not by import: the supervisor never imports the worker (tests/unit/test_structure.py).
ZYGOTE_MODULE = "service.node.zygote"
SHIM_MODULE = "service.node.shim"


class Zygotes:
    """One warm process per node (``python -m service.node.zygote``), each forking that node's
    workers for the shims torchrun starts. Started with the agents' environment so the start-up
    settings match (a shim whose settings differ starts its worker the slow way instead)."""

    def __init__(self, socket_dir: str, nproc_per_node: int, log_format: str = "text"):
        self.socket_dir, self.log_format = socket_dir, log_format
        self.nproc = nproc_per_node
        self.procs: dict[int, subprocess.Popen] = {}

    def socket(self, node: int) -> str:
        return os.path.join(self.socket_dir, f"zygote-node{node}.sock")

    def ensure(self, node: int, env: dict[str, str]) -> str:
        """The node's socket path; (re)starts its warm process if it is not running."""
        proc = self.procs.get(node)
        if proc is None or proc.poll() is not None:
            env = dict(env)
            if "OMP_NUM_THREADS" not in env and self.nproc > 1:
                env["OMP_NUM_THREADS"] = "1"  # what torchrun gives its workers in that case
            cmd = [sys.executable, "-m", ZYGOTE_MODULE, "--socket", self.socket(node),
                   "--log-format", self.log_format]
            # Its own session: a Ctrl-C in the terminal reaches the supervisor, which stops the
            # job in order, not the warm process (whose workers would die with it). preexec_fn
            # is one prctl (ctypes is imported by then), as for the torchrun agents.
            self.procs[node] = subprocess.Popen(
                cmd, env=env, preexec_fn=die_with_parent, start_new_session=True)  # noqa: PLW1509
            log.info("node %d: warm process pid %d", node, self.procs[node].pid)
        return self.socket(node)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until every warm process serves (its socket appears only then); a slow or failed one
        only costs its shims the slow start, so this gives up quietly after ``timeout``."""
        deadline = time.monotonic() + timeout
        for node, proc in self.procs.items():
            while not os.path.exists(self.socket(node)):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.warning("node %d: warm process not ready (exit %s); its workers start without it",
                                node, proc.poll())
                    break
                time.sleep(0.05)

    def stop(self, timeout: float = 10.0, nodes: set[int] | None = None) -> None:
        """SIGTERM (it leaves once its workers are gone), SIGKILL after ``timeout``; every
        node's, or those of ``nodes`` (nodes left out of the job), which are then forgotten."""
        procs = {n: p for n, p in self.procs.items() if nodes is None or n in nodes}
        if nodes is not None:
            self.procs = {n: p for n, p in self.procs.items() if n not in nodes}
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()  # its workers die with it (PR_SET_PDEATHSIG)
                proc.wait(timeout=10)
