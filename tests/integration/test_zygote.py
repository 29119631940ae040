"""Pre-started workers: the shim torchrun starts, served by a real warm process (zygote), keeps
a worker's exit codes, signals, lifetime and identity; without a zygote it is the plain entry.

Most tests run the zygote with a tiny entry (tests/zygote_entry.py) — the zygote still imports
torch, diffusers and the training code, so forks are of the real warm process; the last one
runs the real worker entry through it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.checkpoint.catalog import Catalog
from service.checkpoint.storage import open_storage
from service.errors import EXIT_PREEMPTED
from service.launch_env import ZYGOTE_SOCKET_ENV as SOCKET_ENV
from service.launch_env import worker_agent_env
from service.supervisor.procs import pid_alive
from tests.helpers import REPO, TINY, base_env, set_args, stop, trace_lines, traced_run, wait_for_step

TEST_ENTRY = "tests.zygote_entry:main"


@dataclass
class Zygote:
    socket: Path
    proc: subprocess.Popen
    log: Path
    env: dict[str, str]

    def shim_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The zygote's own environment (so its start-up settings match) plus ``extra``."""
        return {**self.env, SOCKET_ENV: str(self.socket), **(extra or {})}

    def shim(self, *args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-u", "-m", "service.node.shim", *args], env=self.shim_env(env), cwd=cwd,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )


def start_zygote(tmp: Path, entry: str | None = None, env: dict[str, str] | None = None) -> Zygote:
    sock, log = tmp / "zygote.sock", tmp / "zygote.log"
    env = base_env() if env is None else env
    cmd = [sys.executable, "-m", "service.node.zygote", "--socket", str(sock)]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd + (["--entry", entry] if entry else []), env=env, cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while not sock.exists():  # the socket appears only once the zygote serves
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "zygote not ready in 90 s"
        time.sleep(0.05)
    return Zygote(sock, proc, log, env)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    # Without OMP_NUM_THREADS: numpy's and scipy's OpenBLAS then start server threads on import,
    # which the single-thread test below needs to see stopped by the first fork.
    env = {k: v for k, v in base_env().items() if k != "OMP_NUM_THREADS"}
    z = start_zygote(tmp_path_factory.mktemp("zygote"), TEST_ENTRY, env)
    yield z
    stop(z.proc)


def wait_file(path: Path, proc: subprocess.Popen, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            err = proc.stderr.read()  # type: ignore[union-attr]
            raise AssertionError(f"shim exited {proc.returncode}: {err}")
        assert time.monotonic() < deadline, f"{path} not written"
        time.sleep(0.02)
    return path.read_text()


def wait_gone(pid: int, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still alive after {timeout}s"
        time.sleep(0.05)


@pytest.mark.timeout(60)
def test_exit_codes_pass_through(zygote):
    # `exit N` exists only in the test entry: the plain entry would have failed with usage (2).
    for code in (0, 1, 43):
        shim = zygote.shim("exit", str(code))
        _, err = shim.communicate(timeout=30)
        assert shim.returncode == code, err


@pytest.mark.timeout(60)
def test_forked_worker_has_the_shims_env_cwd_argv_and_stdio(zygote, tmp_path):
    out = tmp_path / "who.json"
    shim = zygote.shim("describe", str(out), env={"FTDIFF_TEST_MARK": "x y"}, cwd=tmp_path)
    stdout, stderr = shim.communicate(timeout=30)
    assert shim.returncode == 0, stderr
    who = json.loads(out.read_text())
    assert who["pid"] != shim.pid  # forked by the zygote, not the shim's own process
    # The shim's environment, and which agent this worker belongs to (for it alone, see
    # service.launch_env.WORKER_AGENT_ENV): its kernel parent is the zygote.
    assert who["env"] == {**zygote.shim_env({"FTDIFF_TEST_MARK": "x y"}), **worker_agent_env(who["pid"], os.getpid())}
    assert who["cwd"] == str(tmp_path)
    assert who["argv"][1:] == ["describe", str(out)]
    assert who["agent"] == os.getpid()  # the shim's parent (torchrun's agent, in a job)
    assert who["sid"] == who["pid"]  # a session of its own, as torchrun gives its workers
    assert who["path"][0] == str(tmp_path)  # `python -m` puts the start directory first
    assert stdout == "to stdout\n" and "to stderr" in stderr  # the shim's descriptors


@pytest.mark.timeout(60)
def test_kill9_of_the_worker_kills_the_shim_with_sigkill(zygote, tmp_path):
    shim = zygote.shim("sleep", str(tmp_path / "pid"))
    worker = int(wait_file(tmp_path / "pid", shim))
    assert worker != shim.pid
    os.kill(worker, signal.SIGKILL)
    assert shim.wait(timeout=20) == -signal.SIGKILL  # what torchrun sees


@pytest.mark.timeout(60)
def test_sigterm_to_the_shim_reaches_the_workers_handler(zygote, tmp_path):
    flag = tmp_path / "term"
    shim = zygote.shim("wait-term", str(flag))
    wait_file(flag, shim)
    shim.send_signal(signal.SIGTERM)
    assert shim.wait(timeout=20) == 43
    assert flag.read_text().splitlines()[-1] == f"handled {signal.SIGTERM.value}"


@pytest.mark.timeout(60)
def test_other_signals_are_forwarded_and_mirrored(zygote, tmp_path):
    shim = zygote.shim("sleep", str(tmp_path / "pid"))
    worker = int(wait_file(tmp_path / "pid", shim))
    shim.send_signal(signal.SIGUSR1)  # the worker has no handler: it dies of it, so does the shim
    assert shim.wait(timeout=20) == -signal.SIGUSR1
    wait_gone(worker)


@pytest.mark.timeout(60)
def test_sigkill_of_the_shim_kills_the_worker(zygote, tmp_path):
    shim = zygote.shim("sleep", str(tmp_path / "pid"))
    worker = int(wait_file(tmp_path / "pid", shim))
    shim.kill()  # torchrun's escalation: nothing of the shim runs any more
    shim.wait(timeout=10)
    wait_gone(worker)


@pytest.mark.timeout(60)
def test_the_zygote_stays_single_threaded(zygote):
    # No Python thread ever (the zygote refuses to serve otherwise), and after a fork no native
    # pool left running: OpenBLAS's pthread_atfork handler stops its threads; OpenMP never ran.
    shim = zygote.shim("exit", "0")
    shim.communicate(timeout=30)
    assert len(os.listdir(f"/proc/{zygote.proc.pid}/task")) == 1


@pytest.mark.timeout(90)
def test_other_startup_settings_are_refused_and_the_shim_starts_the_plain_entry(zygote):
    # OMP_NUM_THREADS is read when torch loads: a worker forked from this zygote would run with
    # the zygote's value. The shim falls back to `python -m service.train` (which knows no
    # `exit` action: its usage error, exit 2, proves which entry ran).
    shim = zygote.shim("exit", "0", env={"OMP_NUM_THREADS": "2"})
    _, err = shim.communicate(timeout=80)
    assert "start-up settings differ: OMP_NUM_THREADS" in err
    assert shim.returncode == 2 and "python -m service.train" in err, err


@pytest.mark.timeout(90)
def test_without_a_zygote_the_shim_execs_the_plain_entry(tmp_path):
    shim = Zygote(tmp_path / "nothing.sock", None, tmp_path, base_env()).shim(  # type: ignore[arg-type]
        "--config", str(tmp_path / "missing.toml"))
    _, err = shim.communicate(timeout=80)
    assert shim.returncode == 2, err  # the real entry's config error
    assert "no warm process" in err and "missing.toml" in err


@pytest.mark.timeout(90)
def test_a_dead_zygote_takes_its_workers_and_their_shims_die_by_sigkill(tmp_path):
    z = start_zygote(tmp_path, TEST_ENTRY)
    try:
        shim = z.shim("sleep", str(tmp_path / "pid"))
        worker = int(wait_file(tmp_path / "pid", shim))
        z.proc.kill()
        assert shim.wait(timeout=20) == -signal.SIGKILL
        wait_gone(worker)
    finally:
        stop(z.proc)


@pytest.mark.timeout(120)
def test_sigterm_through_the_shim_commits_the_real_workers_emergency_checkpoint(tmp_path):
    z = start_zygote(tmp_path, None)  # the real worker entry
    try:
        dirs = traced_run(tmp_path)
        shim = z.shim("--log-format", "json", *set_args(TINY + [
            "train.max_steps=500", "checkpoint.every_steps=100", dirs.url_arg, "train.step_sleep_s=0.05"]),
            env=dirs.env)
        wait_for_step(dirs.trace, 3, shim, timeout=60)
        shim.send_signal(signal.SIGTERM)
        _, err = shim.communicate(timeout=60)
        assert shim.returncode == EXIT_PREEMPTED, err[-3000:]
        lines = trace_lines(dirs.trace)
        assert shim.pid not in {line["pid"] for line in lines}  # trained by the forked worker
        assert Catalog(open_storage(str(dirs.url))).latest()[0] == max(line["step"] for line in lines)
    finally:
        stop(z.proc)


@pytest.mark.timeout(60)
def test_the_shim_imports_nothing_heavy():
    res = subprocess.run([sys.executable, "-X", "importtime", "-c", "import service.node.shim"], check=False,
                         env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=50)
    assert res.returncode == 0, res.stderr
    imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if "|" in line}
    assert not {m for m in imported if m.split(".")[0] in ("torch", "numpy", "diffusers", "service.dist")}
