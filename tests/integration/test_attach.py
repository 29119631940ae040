"""Attach mode: `ftdiff supervise` beside a job started with plain torchrun orders restarts
through the workers' heartbeats, relays a preemption, and refuses strangers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import pytest

from service import faults
from service.checkpoint.catalog import Catalog
from service.checkpoint.storage import open_storage
from tests.helpers import (
    BASELINE_STEPS,
    REPO,
    assert_bitwise_equal,
    base_env,
    free_port,
    metric_sum,
    set_args,
    stop,
    torchrun_cmd,
    trace_lines,
    traced_run,
    wait_for_port,
    wait_for_step,
    weights,
    worker_pids,
)

TOKEN = "attach-test-token"


def start_supervisor(port: int, metrics_port: int) -> subprocess.Popen:
    args = [f"supervisor.port={port}", f"metrics.port={metrics_port}", "supervisor.hang_timeout_s=4",
            "supervisor.heartbeat_interval_s=0.5"]
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "supervise", *set_args(args)],
                            env=base_env({"FTDIFF_TOKEN": TOKEN}), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_port(port, 30)
    return proc


@contextmanager
def attached_job(tmp_path, overrides: list[str], max_restarts: int = 0,  # type: ignore[no-untyped-def]
                 launcher: str = "torch.distributed.run"):
    """``ftdiff supervise`` and a plain torchrun job (``launcher``: or the agent wrapper) whose
    workers report to it, both stopped on the way out: yields (supervisor, job, trace dir,
    checkpoint dir, metrics port)."""
    port, metrics_port = free_port(), free_port()
    sup = start_supervisor(port, metrics_port)
    try:
        dirs = traced_run(tmp_path)
        job = subprocess.Popen(
            torchrun_cmd([*overrides, dirs.url_arg, f'supervisor.url="http://127.0.0.1:{port}"'],
                         max_restarts=max_restarts, launcher=launcher),
            env=base_env({**dirs.env, "FTDIFF_TOKEN": TOKEN}), cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            yield sup, job, dirs.trace, dirs.url, metrics_port
        finally:
            stop(job)
    finally:
        stop(sup)


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return metric_sum(text, name)


@pytest.mark.timeout(300)
def test_hang_is_cleared_through_the_workers_and_the_run_ends_bitwise_equal(baseline, tmp_path):
    ref_url, _ = baseline
    with attached_job(tmp_path, [
        f"train.max_steps={BASELINE_STEPS}", "checkpoint.every_steps=4", "train.step_sleep_s=0.3",
        "supervisor.heartbeat_interval_s=0.5"], max_restarts=2,
    ) as (_, job, trace, url, metrics_port):
        wait_for_step(trace, 5, job)
        first = worker_pids(trace)
        frozen = first[1]
        old_files = set(trace.glob("*.jsonl"))
        frozen_at = time.time()
        faults.freeze(frozen)
        t0 = time.monotonic()
        while metric(metrics_port, 'ftdiff_job_failures_detected_total{kind="hang"}') < 1:
            assert time.monotonic() - t0 < 30, "hang not detected"
            time.sleep(0.2)
        _, err = job.communicate(timeout=200)
        assert job.returncode == 0, err[-3000:]
        # The frozen worker was ended by its peer on the same node, well before torchrun's own
        # 30 s grace for stopping workers would have run out.
        new_files = set(trace.glob("*.jsonl")) - old_files
        first_step_after = min(json.loads(f.read_text().splitlines()[0])["time"] for f in new_files)
        assert first_step_after - frozen_at < 25, first_step_after - frozen_at
        assert_bitwise_equal(weights(ref_url, "model"), weights(str(url), "model"))
        assert metric(metrics_port, 'ftdiff_job_restarts_total{reason="hang"}') >= 1
        # No step lost: ordered out while waiting on its frozen peer in a collective, the healthy
        # rank left the last step both completed in memory, and the restart went on from there
        # (not from the commit at step 4).
        lines = trace_lines(trace)
        survivor_step = max(line["step"] for line in lines if line["pid"] == first[0])
        restarted = [line for line in lines if line["pid"] not in first.values()]
        assert min(line["step"] for line in restarted) == survivor_step + 1, "a step was lost or redone"
        assert "(restart ordered" in err
        assert metric(metrics_port, 'ftdiff_recovery_seconds_count{kind="hang",source="memory"}') == 1
        assert metric(metrics_port, "ftdiff_steps_lost_total") == 0


@pytest.mark.timeout(300)
def test_when_every_worker_is_stuck_the_agent_ends_them_and_the_run_ends_bitwise_equal(baseline, tmp_path):
    """Both workers SIGSTOPped: no peer is left to end them on its way out, so the torchrun
    agent (`python -m service.node.agent`) does, on the supervisor's word; torchrun restarts
    the group, which resumes from the newest commit, and the run ends bitwise equal. Under
    plain torchrun this job would wait forever."""
    ref_url, _ = baseline
    with attached_job(tmp_path, [
        f"train.max_steps={BASELINE_STEPS}", "checkpoint.every_steps=4", "train.step_sleep_s=0.3",
        "supervisor.heartbeat_interval_s=0.5"], max_restarts=2, launcher="service.node.agent",
    ) as (_, job, trace, url, metrics_port):
        wait_for_step(trace, 5, job)
        first = worker_pids(trace)
        for pid in first.values():
            faults.freeze(pid)
        _, err = job.communicate(timeout=200)
        assert job.returncode == 0, err[-3000:]
        restarted = [line for line in trace_lines(trace) if line["pid"] not in first.values()]
        assert {line["rank"] for line in restarted} == {0, 1}, "both workers were replaced"
        assert err.count("the supervisor found it stuck") >= 2  # by the agent: no peer could
        assert_bitwise_equal(weights(ref_url, "model"), weights(str(url), "model"))
        assert_bitwise_equal(weights(ref_url, "ema"), weights(str(url), "ema"))
        assert metric(metrics_port, 'ftdiff_job_failures_detected_total{kind="hang"}') >= 1


@pytest.mark.timeout(240)
def test_restarting_the_supervisor_leaves_the_job_untouched(tmp_path):
    """A supervisor is rolled like any Deployment: SIGTERM makes it leave, the workers train
    on (same processes, no restart counted), and the next supervisor reports them healthy."""
    with attached_job(tmp_path, [
        "train.max_steps=60", "checkpoint.every_steps=20", "train.step_sleep_s=0.15",
        "supervisor.heartbeat_interval_s=0.3"],
    ) as (sup, job, trace, url, metrics_port):
        wait_for_step(trace, 5, job)
        pids = worker_pids(trace)
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=30) == 0
        port = int(next(a.split("=")[1] for a in sup.args if a.startswith("supervisor.port=")))
        step_at_leave = max(l["step"] for l in trace_lines(trace))
        new_sup = start_supervisor(port, metrics_port)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=5) as r:
                        if r.status == 200:
                            break
                except urllib.error.HTTPError:
                    pass
                assert time.monotonic() < deadline, "the new supervisor never saw the job healthy"
                time.sleep(0.2)
            assert metric(metrics_port, "ftdiff_job_restarts_total") == 0
            assert metric(metrics_port, "ftdiff_job_failures_detected_total") == 0
            _, err = job.communicate(timeout=180)
            assert job.returncode == 0, err[-3000:]
        finally:
            stop(new_sup)
        assert worker_pids(trace) == pids  # the same processes from start to end:
        assert len(list(trace.glob("*.jsonl"))) == len(pids)  # no worker was ever replaced
        assert max(l["step"] for l in trace_lines(trace)) == 60 > step_at_leave
        assert Catalog(open_storage(str(url))).latest()[0] == 60


@pytest.mark.timeout(60)
def test_supervise_refuses_wrong_tokens_and_bad_setup(tmp_path):
    port, metrics_port = free_port(), free_port()
    sup = start_supervisor(port, metrics_port)
    try:
        body = json.dumps({"rank": 0, "local_rank": 0, "node": "0", "pid": 1, "world_size": 1, "step": 0,
                           "phase": "training", "last_committed_step": None, "restart_count": 0,
                           "time": 0}).encode()
        for token in ("wrong", None):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/heartbeat", data=body, method="POST",
                                         headers={"Authorization": f"Bearer {token}"} if token else {})
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=5)
            assert e.value.code == 401
        assert metric(metrics_port, "ftdiff_supervisor_rejected_requests_total") == 2
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=5) as r:
            pytest.fail(f"readyz should be 503 with no workers, got {r.status}")
    except urllib.error.HTTPError as e:
        assert e.code == 503
    finally:
        stop(sup)
    # No token at all: a clear error, exit 2.
    res = subprocess.run([sys.executable, "-m", "service.cli", "supervise", "--set", "supervisor.port=0"],
                         env=base_env({"FTDIFF_TOKEN": ""}), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "token" in res.stderr and "Traceback" not in res.stderr
