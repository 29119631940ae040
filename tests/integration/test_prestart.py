"""`ftdiff train` with supervisor.prestart_workers: workers forked by a warm process per node
recover from a kill -9 and end bitwise equal to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from service.supervisor.procs import pid_alive
from tests.helpers import (
    BASELINE_STEPS,
    SupervisedJob,
    assert_bitwise_equal,
    losses,
    trace_lines,
    weights,
    worker_pids,
)


def parent(pid: int) -> int | None:
    """The kernel's parent of ``pid`` (a forked worker reports the torchrun agent to itself);
    None once it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError):
        return None


def is_zygote(pid: int) -> bool:
    return b"service.node.zygote" in Path(f"/proc/{pid}/cmdline").read_bytes()


@pytest.mark.timeout(200)
def test_prestarted_workers_recover_from_kill9_bitwise_equal(baseline, tmp_path):
    ref_url, ref_loss = baseline
    job = SupervisedJob(tmp_path, [f"train.max_steps={BASELINE_STEPS}", "checkpoint.every_steps=4",
                                   "train.step_sleep_s=0.25", "supervisor.prestart_workers=true"])
    job.wait_step(6)
    before = worker_pids(job.trace)
    zygote = parent(before[1])
    # Forked by the warm process, not started by torchrun.
    assert zygote is not None and is_zygote(zygote) and parent(before[0]) == zygote
    os.kill(before[1], signal.SIGKILL)
    deadline = time.monotonic() + 90  # the restarted workers come from the same warm process
    while set(worker_pids(job.trace).values()) & set(before.values()):
        assert time.monotonic() < deadline and job.proc.poll() is None, "no restarted worker traced"
        time.sleep(0.05)
    after = worker_pids(job.trace)
    assert all(parent(pid) in (zygote, None) for pid in after.values())
    assert any(parent(pid) == zygote for pid in after.values())
    code, err = job.finish()
    assert code == 0, err[-4000:]
    assert not pid_alive(zygote)  # stopped with the job
    assert {line["pid"] for line in trace_lines(job.trace)} >= set(before.values()) | set(after.values())
    assert_bitwise_equal(weights(ref_url, "model"), weights(job.url, "model"))
    assert_bitwise_equal(weights(ref_url, "ema"), weights(job.url, "ema"))
    # The same loss at every logged step; the step in flight at the kill may have no line at
    # all (rank 0 logs after the per-step all-reduce, which the dead rank never joined, and the
    # memory tier resumes after that step: it is not trained again).
    got = losses(err)
    assert got == {step: ref_loss[step] for step in got} and len(ref_loss) - len(got) <= 1
