"""Two real hosts: network namespaces joined by a veth pair, one torchrun agent in each,
rendezvous over the veth addresses, `ftdiff supervise` beside them. Cutting one host's link is
detected as a lost node and the job continues on the surviving host (min nodes 1) to the end.

Needs root and `ip netns`; skipped with the reason where that is not permitted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest
import torch

from service.checkpoint.catalog import Catalog
from service.checkpoint.storage import open_storage
from tests.helpers import (
    BASELINE_STEPS,
    REPO,
    TINY,
    base_env,
    set_args,
    stop,
    traced_run,
    wait_for_step,
    weights,
)

pytestmark = pytest.mark.multiprocess
SUBNET = "10.213.7"  # addresses inside this test's own namespaces only
TOKEN = "multihost-token"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@pytest.fixture
def two_hosts():
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2 (ip netns) to build two hosts")
    tag = uuid.uuid4().hex[:6]
    ns = (f"ftd-a-{tag}", f"ftd-b-{tag}")
    veth = (f"fa{tag}", f"fb{tag}")
    try:
        _ip("netns", "add", ns[0])
    except subprocess.CalledProcessError as e:
        pytest.skip(f"network namespaces not permitted here: {e.stderr.decode().strip()}")
    try:
        _ip("netns", "add", ns[1])
        _ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for i in (0, 1):
            _ip("link", "set", veth[i], "netns", ns[i])
            _ip("-n", ns[i], "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", veth[i])
            _ip("-n", ns[i], "link", "set", veth[i], "up")
            _ip("-n", ns[i], "link", "set", "lo", "up")
        yield ns, veth
    finally:
        for name in ns:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=20)


def _in(ns: str, cmd: list[str], env: dict[str, str], log) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], env=base_env(env), cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)


def _metric(ns: str, port: int, name: str) -> float:
    code = (f"import urllib.request;t=urllib.request.urlopen('http://{SUBNET}.1:{port}/metrics',timeout=5)"
            ".read().decode();print(sum(float(l.rsplit(' ',1)[1]) for l in t.splitlines() "
            f"if l.startswith({name!r})))")
    res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=30)
    return float(res.stdout.strip() or "nan")


@pytest.mark.timeout(300)
def test_cut_link_is_a_lost_node_and_the_survivor_finishes(two_hosts, baseline, tmp_path):
    """Also the min-nodes-1 case: the survivor continues alone, with the same global batch, and
    ends within float tolerance of the fault-free run."""
    (ns_a, ns_b), (veth_a, veth_b) = two_hosts
    dirs = traced_run(tmp_path)
    trace, url = dirs.trace, dirs.url
    sup_port, metrics_port, rdzv_port = 29450, 9400, 29400  # fresh namespaces: nothing else there
    common = TINY + [f"train.max_steps={BASELINE_STEPS}", "checkpoint.every_steps=4", f'checkpoint.url="{url}"',
                     "train.step_sleep_s=0.3", "supervisor.hang_timeout_s=4", "supervisor.heartbeat_interval_s=0.5",
                     f'supervisor.url="http://{SUBNET}.1:{sup_port}"']
    env = {"FTDIFF_TOKEN": TOKEN, **dirs.env}
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("sup", "a", "b")}
    sup = _in(ns_a, [sys.executable, "-m", "service.cli", "supervise", *set_args(
        common + ['supervisor.host="0.0.0.0"', f"supervisor.port={sup_port}",
                  'metrics.host="0.0.0.0"', f"metrics.port={metrics_port}"])], env, logs["sup"])
    agents = []
    for i, (ns, dev) in enumerate(((ns_a, veth_a), (ns_b, veth_b))):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint={SUBNET}.1:{rdzv_port}", "--rdzv-id=multihost",
               # host A serves the rendezvous store (hostname matching cannot tell inside netns)
               f"--rdzv-conf=is_host={'true' if i == 0 else 'false'},keep_alive_interval=1,"
               "keep_alive_max_attempt=3,last_call_timeout=1",
               f"--local-addr={SUBNET}.{i + 1}", "--max-restarts=3", "-m", "service.train",
               "--log-format", "json", *set_args(common)]
        agents.append(_in(ns, cmd, {**env, "FTDIFF_NODE": "ab"[i], "GLOO_SOCKET_IFNAME": dev,
                                    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}, logs["ab"[i]]))
    try:
        wait_for_step(trace, 6, agents[0], timeout=120)
        first = [json.loads(l) for f in trace.glob("*.jsonl") for l in f.read_text().splitlines()]
        assert {l["world_size"] for l in first} == {2}, "both hosts should train together first"
        _ip("-n", ns_b, "link", "set", veth_b, "down")  # host B drops off the network
        cut_at = time.monotonic()
        while _metric(ns_a, metrics_port, 'ftdiff_job_failures_detected_total{kind="lost_node"}') < 1:
            assert time.monotonic() - cut_at < 60, "lost node not detected"
            time.sleep(0.5)
        assert agents[0].wait(timeout=200) == 0, (tmp_path / "a.log").read_text()[-3000:]
        catalog = Catalog(open_storage(str(url)))
        step, manifest = catalog.latest()
        assert step == BASELINE_STEPS and manifest.world_size == 1  # finished on the surviving host
        assert catalog.verify(step) == []
        ref, got = weights(baseline[0], "model"), weights(str(url), "model")
        for k in ref:
            torch.testing.assert_close(ref[k], got[k], rtol=1e-4, atol=1e-5)
        time.sleep(5)  # > hang_timeout: a worker that finished must not look hung afterwards
        assert _metric(ns_a, metrics_port, 'ftdiff_job_failures_detected_total{kind="hang"}') == 0
    finally:
        for proc in (*agents, sup):
            stop(proc)
        for log in logs.values():
            log.close()
