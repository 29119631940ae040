"""Two real hosts: network namespaces joined by a veth pair, one torchrun agent in each,
rendezvous over the veth addresses, `ftdiff supervise` beside them. Cutting one host's link is
detected as a lost node and the job continues on the surviving host (min nodes 1) to the end.

Needs root and `ip netns`; skipped with the reason where that is not permitted.
"""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch

from service.checkpoint.catalog import Catalog
from service.checkpoint.storage import open_storage
from tests.helpers import BASELINE_STEPS, TINY, set_args, stop_tree, traced_run, wait_for_step, weights
from tests.netns import SUBNET, in_host, ip, metric, two_hosts

TOKEN = "multihost-token"


@pytest.fixture
def two_hosts_fixture():
    with two_hosts() as hosts:
        yield hosts


SUP_PORT, METRICS_PORT, RDZV_PORT = 29450, 9400, 29400  # fresh namespaces: nothing else there


def _start(hosts, tmp_path, common: list[str], env: dict[str, str], nnodes: str, rdzv_id: str,  # type: ignore[no-untyped-def]
           keep_alive_attempts: int) -> tuple[object, list, dict]:
    """`ftdiff supervise` on host A and one torchrun agent per host: (supervisor, agents, log files)."""
    host_a = hosts[0]
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("sup", "a", "b")}
    sup = in_host(host_a, [sys.executable, "-m", "service.cli", "supervise", *set_args(
        common + ['supervisor.host="0.0.0.0"', f"supervisor.port={SUP_PORT}",
                  'metrics.host="0.0.0.0"', f"metrics.port={METRICS_PORT}"])], env, logs["sup"])
    agents = []
    for i, host in enumerate(hosts):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint={SUBNET}.1:{RDZV_PORT}", f"--rdzv-id={rdzv_id}",
               # host A serves the rendezvous store (hostname matching cannot tell inside netns)
               (f"--rdzv-conf=is_host={'true' if i == 0 else 'false'},keep_alive_interval=1,"
               f"keep_alive_max_attempt={keep_alive_attempts},last_call_timeout=1"),
               f"--local-addr={SUBNET}.{i + 1}", "--max-restarts=3", "-m", "service.train",
               "--log-format", "json", *set_args(common)]
        agents.append(in_host(host, cmd, {**env, "FTDIFF_NODE": "ab"[i], "GLOO_SOCKET_IFNAME": host.dev,
                                    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}, logs["ab"[i]]))
    return sup, agents, logs


@pytest.mark.timeout(300)
def test_cut_link_is_a_lost_node_and_the_survivor_finishes(two_hosts_fixture, baseline, tmp_path):
    """Also the min-nodes-1 case: the survivor continues alone, with the same global batch, and
    ends within float tolerance of the fault-free run."""
    host_a, host_b = two_hosts_fixture
    dirs = traced_run(tmp_path)
    trace, url = dirs.trace, dirs.url
    common = TINY + [f"train.max_steps={BASELINE_STEPS}", "checkpoint.every_steps=4", f'checkpoint.url="{url}"',
                     "train.step_sleep_s=0.3", "supervisor.hang_timeout_s=4", "supervisor.heartbeat_interval_s=0.5",
                     f'supervisor.url="http://{SUBNET}.1:{SUP_PORT}"']
    env = {"FTDIFF_TOKEN": TOKEN, **dirs.env}
    sup, agents, logs = _start((host_a, host_b), tmp_path, common, env, "1:2", "multihost", keep_alive_attempts=3)
    try:
        wait_for_step(trace, 6, agents[0], timeout=120)
        first = [json.loads(l) for f in trace.glob("*.jsonl") for l in f.read_text().splitlines()]
        assert {l["world_size"] for l in first} == {2}, "both hosts should train together first"
        ip("-n", host_b.ns, "link", "set", host_b.dev, "down")  # host B drops off the network
        cut_at = time.monotonic()
        while metric(host_a, METRICS_PORT, 'ftdiff_job_failures_detected_total{kind="lost_node"}') < 1:
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
        assert metric(host_a, METRICS_PORT, 'ftdiff_job_failures_detected_total{kind="hang"}') == 0
    finally:
        for proc in (*agents, sup):
            stop_tree(proc)
        for log in logs.values():
            log.close()


@pytest.mark.timeout(300)
def test_a_partition_that_heals_is_recovered_with_no_committed_step_lost(two_hosts_fixture, tmp_path):
    """The link between the hosts goes down mid-step and comes back 10 s later, both hosts alive
    throughout (min nodes 2: nobody may go on alone). The job is seen stuck, restarts once the
    hosts can talk again, loses no committed step and finishes."""
    host_a, host_b = two_hosts_fixture
    dirs = traced_run(tmp_path)
    trace, url = dirs.trace, dirs.url
    common = TINY + ["train.max_steps=24", "checkpoint.every_steps=3", f'checkpoint.url="{url}"',
                     "checkpoint.keep_last=100", "train.step_sleep_s=0.3", "supervisor.hang_timeout_s=4",
                     "supervisor.heartbeat_interval_s=0.5", "train.collective_timeout_s=30",
                     f'supervisor.url="http://{SUBNET}.1:{SUP_PORT}"']
    env = {"FTDIFF_TOKEN": TOKEN, **dirs.env}
    sup, agents, logs = _start((host_a, host_b), tmp_path, common, env, "2:2", "partition", keep_alive_attempts=30)
    try:
        wait_for_step(trace, 7, agents[0], timeout=120)
        committed_before = set(Catalog(open_storage(str(url))).committed_steps())
        ip("-n", host_b.ns, "link", "set", host_b.dev, "down")
        cut_at = time.monotonic()
        detected = 0.0
        while detected < 1:
            detected = sum(metric(host_a, METRICS_PORT, f'ftdiff_job_failures_detected_total{{kind="{kind}"}}')
                           for kind in ("hang", "lost_node"))
            assert time.monotonic() - cut_at < 4 + 2 * 0.5 + 2, "the stuck job was not detected in time"
            time.sleep(0.2)
        time.sleep(max(0.0, 10 - (time.monotonic() - cut_at)))
        ip("-n", host_b.ns, "link", "set", host_b.dev, "up")
        for agent, name in zip(agents, "ab"):
            assert agent.wait(timeout=200) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        catalog = Catalog(open_storage(str(url)))
        assert catalog.latest()[0] == 24
        assert committed_before <= set(catalog.committed_steps())
        said = (tmp_path / "sup.log").read_text()
        assert "network" in said, said[-3000:]
    finally:
        for proc in (*agents, sup):
            stop_tree(proc)
        for log in logs.values():
            log.close()
