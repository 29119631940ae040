"""The supervised local job (`ftdiff train`) under real faults: a crash loop and SIGTERM to
the supervisor here; worker crash, hang (with its detection bound), lost node, storage outage
and preemption together in test_campaign.py; shrinking to fewer nodes (min nodes 1) in
test_multihost.py."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from service import faults
from service.checkpoint.catalog import Catalog
from service.checkpoint.storage import open_storage
from service.errors import EXIT_PREEMPTED
from tests.helpers import SupervisedJob as Job
from tests.helpers import (
    trace_lines,
)


@pytest.mark.timeout(300)
def test_crash_loop_gives_up_with_a_report(tmp_path):
    job = Job(tmp_path, ["train.max_steps=20", "checkpoint.every_steps=2", "supervisor.max_restarts=1",
                         "supervisor.crash_loop_failures=1"], env={"FTDIFF_FAIL_AT_STEP": "3"})
    code, err = job.finish()
    assert code == 1
    assert "job failed" in err and "failing worker: rank" in err
    assert "injected failure at step 3" in err
    assert Catalog(open_storage(job.url)).latest()[0] == 2  # committed work survives


@pytest.mark.timeout(200)
def test_sigterm_to_supervisor_commits_and_exits_preempted(tmp_path):
    job = Job(tmp_path, ["train.max_steps=300", "checkpoint.every_steps=100", "train.step_sleep_s=0.1"])
    job.wait_step(6)
    job.proc.send_signal(signal.SIGTERM)
    code, err = job.finish(90)
    assert code == EXIT_PREEMPTED, err[-3000:]
    last = max(line["step"] for line in trace_lines(job.trace))
    catalog = Catalog(open_storage(job.url))
    assert catalog.latest()[0] == last
    assert catalog.verify(last) == []


@pytest.mark.timeout(200)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["ctrl-c", "hangup"])
def test_ctrl_c_or_a_hangup_in_a_terminal_commits_and_exits_preempted_without_a_relaunch(tmp_path, sig):
    """Ctrl-C (SIGINT) and a closed terminal (SIGHUP) signal the terminal's whole foreground
    process group, not only `ftdiff train`: the job still stops the way one SIGTERM to the
    supervisor stops it -- one emergency commit of the last step, exit 43, no relaunch. The
    supervisor is held (SIGSTOP, a loaded machine) for the moment the signal arrives: an agent
    that got a Ctrl-C too stopped its workers and exited on its own meanwhile, and the
    supervisor took that for a lost node and relaunched it; a hangup killed the supervisor."""
    job = Job(tmp_path, ["train.max_steps=300", "checkpoint.every_steps=100", "train.step_sleep_s=0.1"],
              own_group=True)
    job.wait_step(4)
    faults.freeze(job.proc.pid)
    try:
        os.killpg(job.proc.pid, sig)
        time.sleep(3)
    finally:
        faults.thaw(job.proc.pid)
    code, err = job.finish(90)
    assert code == EXIT_PREEMPTED, err[-3000:]
    lines = trace_lines(job.trace)
    last = max(line["step"] for line in lines)
    assert len({line["pid"] for line in lines}) == 2, f"relaunched after the Ctrl-C: {err[-3000:]}"
    catalog = Catalog(open_storage(job.url))
    assert catalog.latest()[0] == last
    assert catalog.verify(last) == []


@pytest.mark.timeout(200)
def test_a_stop_right_after_a_worker_crash_keeps_the_steps_in_memory(tmp_path):
    """SIGTERM a moment after kill -9 of a worker, before the supervisor has seen the crash:
    torchrun is restarting the workers, and the survivor left its last step in the memory tier.
    The stop waits until the new workers train from it, then commits: nothing trained is lost
    (the stop reached the new workers before they loaded, and the job exited 1 at the older commit)."""
    job = Job(tmp_path, ["train.max_steps=300", "checkpoint.every_steps=5", "train.step_sleep_s=0.1"])
    job.wait_step(8)
    victim = _workers(job.proc.pid)[0]
    faults.kill9(victim)
    trained = max(line["step"] for line in trace_lines(job.trace))
    time.sleep(0.3)
    job.proc.send_signal(signal.SIGTERM)
    code, err = job.finish(120)
    assert code == EXIT_PREEMPTED, err[-3000:]
    catalog = Catalog(open_storage(job.url))
    assert catalog.latest()[0] >= trained, err[-3000:]
    assert catalog.verify(catalog.latest()[0]) == []


@pytest.mark.timeout(300)
def test_an_emergency_save_slower_than_30s_still_commits_within_grace(tmp_path, s3_server, s3_bucket):
    """torchrun SIGKILLs workers 30 s after SIGTERM unless told otherwise; ftdiff gives them
    checkpoint.grace_s plus a margin, and exits 43 only once the commit is in storage."""
    from tests.tcp_proxy import TcpProxy

    upstream = int(s3_server["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    url = f"{s3_bucket}/slow"
    with TcpProxy(upstream) as proxy:
        env = {**s3_server, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
        job = Job(tmp_path, ["train.max_steps=300", "checkpoint.every_steps=100", "train.step_sleep_s=0.1",
                             f'checkpoint.url="{url}"', "checkpoint.grace_s=150"], env=env)
        job.wait_step(4)
        proxy.delay_s = 5.0  # every request to the store now takes 5 s more (4 s: 29.6 s on SeaweedFS)
        asked = time.time()
        job.proc.send_signal(signal.SIGTERM)
        code, err = job.finish(240)
        proxy.delay_s = 0.0
        assert code == EXIT_PREEMPTED, err[-3000:]
        catalog = Catalog(open_storage(url))
        step, manifest = catalog.latest()
        assert step == max(line["step"] for line in trace_lines(job.trace))
        assert manifest.time - asked > 30, "the save was not slow enough to test the 30 s limit"
        assert catalog.verify(step) == []


@pytest.mark.timeout(300)
def test_a_load_slower_than_the_hang_timeout_is_not_a_hang(tmp_path, s3_server, s3_bucket):
    """Throttled storage: resuming takes several hang timeouts, while heartbeats keep coming
    and bytes keep arriving. That is a slow store, not a hang: no restart is ordered."""
    from tests.helpers import run, single_cmd, why
    from tests.tcp_proxy import TcpProxy

    url = f"{s3_bucket}/slowload"
    first = run(single_cmd(["train.max_steps=4", "checkpoint.every_steps=4", f'checkpoint.url="{url}"']),
                env=s3_server)
    assert first.returncode == 0, why(first)
    upstream = int(s3_server["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    with TcpProxy(upstream) as proxy:
        proxy.delay_s = 1.5  # every request 1.5 s slower: the resume takes well over 4 s
        env = {**s3_server, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
        job = Job(tmp_path, ["train.max_steps=7", "checkpoint.every_steps=100", f'checkpoint.url="{url}"'], env=env)
        started = time.monotonic()
        job.wait_step(5)
        loaded_after = time.monotonic() - started
        hangs = job.metric('ftdiff_job_failures_detected_total{kind="hang"}')
        proxy.delay_s = 0.0
        code, err = job.finish(120)
    assert code == 0, err[-3000:]
    # Start-up alone takes ~6 s here; the throttled resume adds over two hang timeouts to it.
    assert loaded_after > 6 + 2 * 4.0, f"step 5 after only {loaded_after:.1f}s: not slow enough to test"
    assert hangs == 0 and "hang detected" not in err
    assert min(line["step"] for line in trace_lines(job.trace)) == 5  # resumed once, never restarted


def _descendants(pid: int) -> list[int]:
    out, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        out += [int(c) for c in children]
        frontier += [int(c) for c in children]
    return out


def _workers(pid: int) -> list[int]:
    """The worker processes under ``pid``: started by torchrun, or (supervisor.prestart_workers)
    forked by the warm process — those carry its command line, so they are found as its children."""
    found = []
    for child in _descendants(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"service.node.zygote" in cmdline:
            try:
                found += [int(c) for c in Path(f"/proc/{child}/task/{child}/children").read_text().split()]
            except OSError:
                pass
        # not the agent, nor the thin shim that gets its worker from the warm process
        elif b"service.train" in cmdline and not any(
                other in cmdline for other in (b"torch.distributed.run", b"service.node.agent", b"service.node.shim")):
            found.append(child)
    return found


def _reporting(job: Job) -> bool:
    """Both ranks have sent a heartbeat (/readyz: every rank of the world fresh). One rank's
    heartbeat already tells the world size; a rank frozen before its first heartbeat would be
    judged by the start-up limit, not the hang timeout."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{job.metrics_port}/readyz", timeout=5) as r:
            return r.status == 200 and job.metric("ftdiff_job_world_size") == 2
    except OSError:  # the supervisor's endpoint is not up yet, or 503: not every rank has reported
        return False


@pytest.mark.timeout(300)
def test_a_worker_stopped_during_a_slow_load_is_still_a_hang(tmp_path, s3_server, s3_bucket):
    """The storage phases get a longer limit only while heartbeats keep coming: a worker
    SIGSTOPped in the middle of a throttled resume goes silent and is caught at the hang
    timeout, not at supervisor.io_timeout_s; the job then finishes."""
    from tests.helpers import HANG_TIMEOUT, run, single_cmd, why
    from tests.tcp_proxy import TcpProxy

    url = f"{s3_bucket}/stuckload"
    first = run(single_cmd(["train.max_steps=4", "checkpoint.every_steps=4", f'checkpoint.url="{url}"']),
                env=s3_server)
    assert first.returncode == 0, why(first)
    upstream = int(s3_server["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    with TcpProxy(upstream) as proxy:
        proxy.delay_s = 1.5
        env = {**s3_server, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
        job = Job(tmp_path, ["train.max_steps=7", "checkpoint.every_steps=100", f'checkpoint.url="{url}"'], env=env)
        deadline = time.monotonic() + 120
        # Heartbeats from both ranks: their Trainers are built and the (slow) resume has begun.
        while not _reporting(job) or len(_workers(job.proc.pid)) < 2:
            assert time.monotonic() < deadline, "workers never started their resume"
            time.sleep(0.2)
        assert trace_lines(job.trace) == []  # no step yet: still loading
        victim = _workers(job.proc.pid)[0]
        faults.freeze(victim)
        frozen_at = time.monotonic()
        while job.metric('ftdiff_job_failures_detected_total{kind="hang"}') < 1:
            if time.monotonic() - frozen_at > 60:
                job.proc.terminate()
                raise AssertionError(f"a silent worker in a load was never called hung: {job.finish(60)[1][-3000:]}")
            time.sleep(0.2)
        detected_after = time.monotonic() - frozen_at
        proxy.delay_s = 0.0
        code, err = job.finish(150)
    assert code == 0, err[-3000:]
    assert detected_after < HANG_TIMEOUT + 10, detected_after  # not supervisor.io_timeout_s (300 s)
    assert victim not in {l["pid"] for l in trace_lines(job.trace)}
    assert max(l["step"] for l in trace_lines(job.trace)) == 7
