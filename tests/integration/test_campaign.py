"""The fault campaign: a supervised 2-node x 1-process job on S3 survives five faults of
different kinds and ends bitwise equal to a fault-free run, with no committed step lost."""

from __future__ import annotations

import signal
import time

import pytest

from service import faults
from service.checkpoint.catalog import Catalog
from service.checkpoint.storage import open_storage
from service.errors import EXIT_PREEMPTED
from service.supervisor import procs
from tests.helpers import (
    HANG_TIMEOUT,
    INTERVAL,
    assert_bitwise_equal,
    run,
    stop,
    torchrun_cmd,
    trace_lines,
    weights,
    why,
    worker_pids,
)
from tests.helpers import SupervisedJob as Job
from tests.tcp_proxy import TcpProxy

STEPS = 24
COMMON = [f"train.max_steps={STEPS}", "checkpoint.every_steps=3", "checkpoint.keep_last=100",
          "supervisor.startup_timeout_s=45"]  # a stuck restart recovers within the waits below


def _newest_pids(job: Job) -> set[int]:
    return set(worker_pids(job.trace).values())


def _wait(cond, job: Job, what: str, timeout: float = 90) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if job.proc.poll() is not None:
            job.fail(f"job ended during: {what}")
        if time.monotonic() > deadline:
            job.fail(f"timed out: {what}")
        time.sleep(0.1)


def _max_step(job: Job) -> int:
    lines = trace_lines(job.trace)
    return max((line["step"] for line in lines), default=0)


def _assert_no_step_lost(job: Job) -> None:
    lost = job.metric("ftdiff_steps_lost_total")
    if lost:
        stop(job.proc)
        full = job.log()
        said = [line for line in full.splitlines() if "recover" in line or "memory tier" in line]
        pytest.fail(f"{lost} step(s) lost:\n" + "\n".join(said))


def _restarted_and_past(job: Job, before: set[int], step: int) -> bool:
    return bool(_newest_pids(job) - before) and _max_step(job) >= step


@pytest.mark.timeout(420)
def test_five_fault_kinds_end_bitwise_equal(s3_server, s3_bucket, tmp_path):
    ref = tmp_path / "reference"
    res = run(torchrun_cmd(COMMON + [f'checkpoint.url="{ref}"']))
    assert res.returncode == 0, why(res)

    upstream = int(s3_server["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    url = f"{s3_bucket}/campaign"
    committed_seen: set[int] = set()
    with TcpProxy(upstream) as proxy:
        env = {**s3_server, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
        overrides = COMMON + [f'checkpoint.url="{url}"', "train.step_sleep_s=0.2", "supervisor.min_nodes=2"]
        job = Job(tmp_path / "run1", overrides, nnodes=2, nproc=1, env=env)
        catalog = Catalog(open_storage(url))

        def note_commits() -> None:
            committed_seen.update(catalog.committed_steps())

        # 1. worker crash
        job.wait_step(4)
        before = _newest_pids(job)
        faults.kill9(worker_pids(job.trace)[1])
        _wait(lambda: _restarted_and_past(job, before, 6), job, "recovery from worker crash")
        # What it cost, as served: one recovery from the survivor's memory, no step lost.
        _wait(lambda: job.metric('ftdiff_recovery_seconds_count{kind="crash",source="memory"}') >= 1,
              job, "crash recovery counted")
        _assert_no_step_lost(job)
        note_commits()

        # 2. hang: a frozen worker, detected within hang_timeout + 2 heartbeat intervals
        before = _newest_pids(job)
        frozen_at = time.monotonic()
        faults.freeze(worker_pids(job.trace)[0])
        _wait(lambda: job.metric('ftdiff_job_failures_detected_total{kind="hang"}') >= 1, job, "hang detection")
        assert time.monotonic() - frozen_at <= HANG_TIMEOUT + 2 * INTERVAL + 1.0
        _wait(lambda: _restarted_and_past(job, before, 9), job, "recovery from hang")
        # The healthy rank left the last step both completed in memory on its way out.
        _wait(lambda: job.metric('ftdiff_recovery_seconds_count{kind="hang",source="memory"}') >= 1,
              job, "hang recovery counted")
        _assert_no_step_lost(job)
        note_commits()

        # 3. lost node: one torchrun agent disappears
        before = _newest_pids(job)
        faults.kill9(procs.children(job.proc.pid)[-1])
        _wait(lambda: _restarted_and_past(job, before, 12), job, "recovery from lost node")
        note_commits()

        # 4. storage outage: the S3 endpoint is cut for a while; training goes on
        step_at_cut = _max_step(job)
        proxy.cut()
        time.sleep(4)
        assert _max_step(job) > step_at_cut, "training stopped while storage was down"
        proxy.restore()
        _wait(lambda: max(catalog.committed_steps(), default=0) > step_at_cut + 1, job, "commits after outage")
        note_commits()

        # 5. preemption: SIGTERM to the supervisor, then the job is started again
        job.wait_step(17)
        job.proc.send_signal(signal.SIGTERM)
        code, err = job.finish(120)
        assert code == EXIT_PREEMPTED, err[-3000:]
        preempted_at = _max_step(job)
        assert catalog.latest()[0] == preempted_at  # nothing lost on preemption
        note_commits()

        job2 = Job(tmp_path / "run2", COMMON + [f'checkpoint.url="{url}"', "supervisor.min_nodes=2"],
                   nnodes=2, nproc=1, env=env)
        code, err = job2.finish(200)
        assert code == 0, err[-3000:]

    final = Catalog(open_storage(url))
    assert final.latest()[0] == STEPS
    # Zero committed checkpoints lost: every step ever seen committed is still committed and intact.
    still = set(final.committed_steps())
    assert committed_seen <= still, committed_seen - still
    for step in sorted(committed_seen)[-3:]:
        assert final.verify(step) == []
    assert_bitwise_equal(weights(str(ref), "model"), weights(url, "model"))
    assert_bitwise_equal(weights(str(ref), "ema"), weights(url, "ema"))
