"""Pods on one machine: each torchrun agent is pid 1 of its own PID namespace, with its own
hostname and network namespace (as a Kubernetes pod is), and `ftdiff supervise` runs beside
them (a Deployment). Workers in different pods share pids, and a restarted pod's worker gets
the pid of the one before it: exit orders and supervisor restarts must not confuse them.

Needs root and `ip netns`; skipped with the reason where that is not permitted.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from service import faults
from service.checkpoint.catalog import Catalog
from service.checkpoint.storage import open_storage
from tests.helpers import TINY, set_args, stop, trace_lines, traced_run, wait_for_step
from tests.netns import Host, host_pid, in_host, in_pod, kill_pod, metric, ready, two_hosts

TOKEN = "pods-token"
SUP_PORT, METRICS_PORT, RDZV_PORT = 29450, 9400, 29400  # fresh namespaces: nothing else there
STEPS = 40


def _agent(hosts: tuple[Host, Host], i: int, common: list[str], store_outside: bool = False) -> list[str]:
    # is_host from the pod's index (the Job completion index), or no pod hosts the store at all
    # when it runs on its own (`ftdiff rdzv-store`, as deploy/k8s does).
    is_host = "true" if i == 0 and not store_outside else "false"
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={hosts[0].hostname}:{RDZV_PORT}", "--rdzv-id=pods",
            (f"--rdzv-conf=is_host={is_host},keep_alive_interval=1,"
             "keep_alive_max_attempt=3,last_call_timeout=2"),
            f"--local-addr={hosts[i].addr}", "--max-restarts=5", "-m", "service.train",
            "--log-format", "json", *set_args(common)]


def _supervisor(host: Host, common: list[str], env: dict[str, str], log) -> object:  # type: ignore[no-untyped-def]
    return in_host(host, [sys.executable, "-m", "service.cli", "supervise", *set_args(
        common + ['supervisor.host="0.0.0.0"', f"supervisor.port={SUP_PORT}",
                  'metrics.host="0.0.0.0"', f"metrics.port={METRICS_PORT}"])], env, log)


def _pod_lines(trace, node: str) -> list[dict]:  # type: ignore[no-untyped-def]
    return [l for l in trace_lines(trace) if l.get("node") == node]


def _wait(cond, what: str, timeout: float, *procs) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        for p in procs:
            assert p.poll() is None, f"{what}: a process ended early (exit {p.returncode})"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


@pytest.mark.timeout(300)
def test_restarted_pod_with_the_same_pids_trains_on_and_a_rolled_supervisor_leaves_it_alone(tmp_path):
    with two_hosts() as hosts:
        a, b = hosts
        dirs = traced_run(tmp_path)
        common = TINY + [f"train.max_steps={STEPS}", "checkpoint.every_steps=5", dirs.url_arg,
                         "train.step_sleep_s=0.3", "supervisor.hang_timeout_s=4",
                         "supervisor.heartbeat_interval_s=0.5", f'supervisor.url="http://{a.hostname}:{SUP_PORT}"']
        env = {"FTDIFF_TOKEN": TOKEN, **dirs.env, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        logs = {n: open(tmp_path / f"{n}.log", "w") for n in ("sup", "sup2", "a", "b", "b2")}

        def pod(i: int, log: str):  # type: ignore[no-untyped-def]
            h = hosts[i]
            return in_pod(h, _agent(hosts, i, common), {**env, "FTDIFF_NODE": h.hostname,
                                                        "GLOO_SOCKET_IFNAME": h.dev}, logs[log])

        sup = _supervisor(a, common, env, logs["sup"])
        pods = [pod(0, "a"), pod(1, "b")]
        procs = [sup, *pods]
        try:
            wait_for_step(dirs.trace, 4, pods[0], timeout=150)
            old_b = _pod_lines(dirs.trace, b.hostname)
            assert old_b and {l["world_size"] for l in old_b} == {2}, "both pods should train together"
            b_pid = old_b[-1]["pid"]

            # Pod B's only worker wedges: the supervisor calls node B lost and orders every worker
            # of that generation to exit, including B's, which can never act on the order.
            faults.freeze(host_pid(pods[1], b_pid))
            _wait(lambda: metric(a, METRICS_PORT, "ftdiff_job_failures_detected_total") >= 1,
                  "the wedged pod to be detected", 60, sup, pods[0])
            # Kubernetes replaces the pod: same hostname, a fresh PID namespace, so its worker
            # gets the very pid the doomed one had.
            kill_pod(pods[1])
            killed_at = time.time()
            pods[1] = pod(1, "b2")
            procs.append(pods[1])
            _wait(lambda: any(l["time"] > killed_at and l["world_size"] == 2
                              for l in _pod_lines(dirs.trace, b.hostname)),
                  "the new pod B to train with pod A", 150, sup, *pods)
            new_b = [l for l in _pod_lines(dirs.trace, b.hostname) if l["time"] > killed_at]
            assert {l["pid"] for l in new_b} == {b_pid}, (
                "the new pod's worker (same pid as the doomed one) should train on, never told to exit")

            # Settled: both pods trained three steps together (a join can make torchrun restart
            # the workers once more; that is the rendezvous, not the supervisor).
            joined = min(l["step"] for l in new_b if l["world_size"] == 2)
            _wait(lambda: any(l["step"] >= joined + 3 and l["world_size"] == 2 for l in trace_lines(dirs.trace)),
                  "both pods to train on together", 120, sup, *pods)
            settled_at = time.time()
            # The supervisor is rolled mid-run: it leaves, the job trains on untouched.
            pids_before = {(l["node"], l["pid"], l["rank"]) for l in trace_lines(dirs.trace)
                           if l["time"] > settled_at - 1}
            files_before = set(dirs.trace.glob("*.jsonl"))
            sup.send_signal(signal.SIGTERM)
            assert sup.wait(timeout=30) == 0
            sup2 = _supervisor(a, common, env, logs["sup2"])
            procs.append(sup2)
            _wait(lambda: ready(a, METRICS_PORT), "the new supervisor to report the job healthy", 40, *pods)
            assert metric(a, METRICS_PORT, "ftdiff_job_restarts_total") == 0
            assert metric(a, METRICS_PORT, "ftdiff_job_failures_detected_total") == 0

            assert pods[0].wait(timeout=200) == 0, (tmp_path / "a.log").read_text()[-3000:]
            assert pods[1].wait(timeout=60) == 0, (tmp_path / "b2.log").read_text()[-3000:]
        finally:
            for p in procs:
                stop(p)
            for log in logs.values():
                log.close()
        late = [l for l in trace_lines(dirs.trace) if l["time"] > settled_at - 1]
        assert set(dirs.trace.glob("*.jsonl")) == files_before, "no worker was replaced after the roll"
        assert {(l["node"], l["pid"], l["rank"]) for l in late} == pids_before
        assert max(l["step"] for l in late if l["node"] == b.hostname) == STEPS  # B trained to the end
        step, manifest = Catalog(open_storage(str(dirs.url))).latest()
        assert step == STEPS and manifest.world_size == 2


@pytest.mark.timeout(300)
def test_with_the_store_outside_the_pods_evicting_pod_0_shrinks_and_grows_back(tmp_path):
    """A drain of pod 0's node: with the rendezvous store in a process of its own (`ftdiff
    rdzv-store`, a Deployment on a cluster) the other pod trains on alone and the replacement
    pod 0 joins it again; pod 1's agent is never restarted by Kubernetes."""
    with two_hosts() as hosts:
        a = hosts[0]
        dirs = traced_run(tmp_path)
        common = TINY + [f"train.max_steps={2 * STEPS}", "checkpoint.every_steps=5", dirs.url_arg,
                         "train.step_sleep_s=0.3", "checkpoint.grace_s=10"]
        env = {**dirs.env, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        logs = {n: open(tmp_path / f"{n}.log", "w") for n in ("store", "a", "b", "a2")}

        def pod(i: int, log: str):  # type: ignore[no-untyped-def]
            h = hosts[i]
            return in_pod(h, _agent(hosts, i, common, store_outside=True),
                          {**env, "FTDIFF_NODE": h.hostname, "GLOO_SOCKET_IFNAME": h.dev}, logs[log])

        store = in_host(a, [sys.executable, "-m", "service.cli", "rdzv-store", "--port", str(RDZV_PORT)],
                        {}, logs["store"])
        pods = [pod(0, "a"), pod(1, "b")]
        procs = [store, *pods]
        try:
            _wait(lambda: any(l["world_size"] == 2 and l["step"] >= 4 for l in trace_lines(dirs.trace)),
                  "both pods to train together", 150, *procs)
            os.kill(host_pid(pods[0], 1), signal.SIGTERM)  # the eviction: SIGTERM to the pod's pid 1
            assert pods[0].wait(timeout=90) is not None
            evicted_at = time.time()
            _wait(lambda: any(l["time"] > evicted_at and l["world_size"] == 1 for l in trace_lines(dirs.trace)),
                  "pod 1 to train on alone", 120, store, pods[1])
            pods.append(pod(0, "a2"))
            procs.append(pods[-1])
            rejoined_at = time.time()
            _wait(lambda: any(l["time"] > rejoined_at and l["world_size"] == 2 for l in trace_lines(dirs.trace)),
                  "the replacement pod 0 to join", 150, store, pods[1], pods[2])
            assert pods[1].wait(timeout=200) == 0, (tmp_path / "b.log").read_text()[-3000:]
            assert pods[2].wait(timeout=60) == 0, (tmp_path / "a2.log").read_text()[-3000:]
        finally:
            for p in procs:
                stop(p)
            for log in logs.values():
                log.close()
        step, manifest = Catalog(open_storage(str(dirs.url))).latest()
        assert step == 2 * STEPS and manifest.world_size == 2
