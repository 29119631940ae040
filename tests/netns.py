"""Hosts and pods on one machine: network namespaces joined by a veth pair (a "host" each), and
inside them PID + UTS + mount namespaces (a "pod": its own pid 1, hostname and /proc).

`ip netns exec NS` bind-mounts /etc/netns/NS/hosts over /etc/hosts, which is how the pods'
hostnames resolve (the role of cluster DNS). Needs root and iproute2; the fixture skips with the
reason where either is missing or namespaces are not permitted.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from tests.helpers import REPO, base_env, metric_sum

SUBNET = "10.213.7"  # addresses inside these namespaces only


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@dataclass(frozen=True)
class Host:
    ns: str
    dev: str
    addr: str
    hostname: str


@contextmanager
def two_hosts() -> Iterator[tuple[Host, Host]]:
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2 (ip netns) to build two hosts")
    tag = uuid.uuid4().hex[:6]
    hosts = tuple(Host(f"ftd-{c}-{tag}", f"f{c}{tag}", f"{SUBNET}.{i + 1}", f"pod-{c}-{tag}")
                  for i, c in enumerate("ab"))
    try:
        ip("netns", "add", hosts[0].ns)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"network namespaces not permitted here: {e.stderr.decode().strip()}")
    etc = [Path("/etc/netns") / h.ns for h in hosts]
    try:
        ip("netns", "add", hosts[1].ns)
        ip("link", "add", hosts[0].dev, "type", "veth", "peer", "name", hosts[1].dev)
        table = "127.0.0.1 localhost\n" + "".join(f"{h.addr} {h.hostname}\n" for h in hosts)
        for h, folder in zip(hosts, etc):
            ip("link", "set", h.dev, "netns", h.ns)
            ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", h.dev)
            ip("-n", h.ns, "link", "set", h.dev, "up")
            ip("-n", h.ns, "link", "set", "lo", "up")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text(table)
        yield hosts  # type: ignore[misc]
    finally:
        for h, folder in zip(hosts, etc):
            subprocess.run(["ip", "netns", "delete", h.ns], check=False, capture_output=True, timeout=20)
            shutil.rmtree(folder, ignore_errors=True)


def in_host(host: Host, cmd: list[str], env: dict[str, str], log: IO[str]) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", host.ns, *cmd], env=base_env(env), cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)


def in_pod(host: Host, cmd: list[str], env: dict[str, str], log: IO[str]) -> subprocess.Popen:
    """``cmd`` as pid 1 of a fresh PID namespace with the host's hostname: a pod. The returned
    process is `unshare`; SIGKILL to it ends the whole pod (--kill-child, then the kernel ends
    every process of a PID namespace whose pid 1 died)."""
    script = 'hostname "$1" && shift && exec "$@"'
    return in_host(host, ["unshare", "--pid", "--uts", "--mount-proc", "--kill-child", "--",
                          "sh", "-c", script, "pod", host.hostname, *cmd], env, log)


def kill_pod(pod: subprocess.Popen) -> None:
    os.kill(pod.pid, signal.SIGKILL)
    pod.wait(timeout=30)


def host_pid(pod: subprocess.Popen, pid_in_pod: int) -> int:
    """The host pid of the process that is ``pid_in_pod`` inside ``pod``'s PID namespace."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(l.split(":", 1) for l in status.read_text().splitlines() if ":" in l)
        except OSError:
            continue
        nspid = fields.get("NSpid", "").split()
        if len(nspid) >= 2 and int(nspid[-1]) == pid_in_pod and _descends(int(nspid[0]), pod.pid):
            return int(nspid[0])
    raise LookupError(f"no process {pid_in_pod} in pod {pod.pid}")


def _descends(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        if pid <= 1:
            return False
    return False


def metric(host: Host, port: int, selector: str) -> float:
    """``metric_sum`` of ``selector`` scraped from inside ``host`` (nan if unreachable)."""
    code = (f"import urllib.request;print(urllib.request.urlopen('http://{host.addr}:{port}/metrics',"
            "timeout=5).read().decode())")
    res = subprocess.run(["ip", "netns", "exec", host.ns, sys.executable, "-c", code],
                         check=False, capture_output=True, text=True, timeout=30)
    return metric_sum(res.stdout, selector) if res.returncode == 0 else float("nan")


def ready(host: Host, port: int) -> bool:
    code = (f"import urllib.request;urllib.request.urlopen('http://{host.addr}:{port}/readyz',timeout=5)")
    return subprocess.run(["ip", "netns", "exec", host.ns, sys.executable, "-c", code],
                          check=False, capture_output=True, timeout=30).returncode == 0
