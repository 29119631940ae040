"""The memory tier under real torchrun jobs: a kill -9 of one worker loses no step (the restart
resumes at the survivor's step, from shared memory) and the run ends bitwise equal to an
uninterrupted one; so does a hung (SIGSTOPped) worker under the supervisor; a corrupted
snapshot is ignored in favour of the object store; a worker stuck in a collective still leaves
its state when torchrun's SIGTERM comes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from service import faults
from service.checkpoint.catalog import Catalog
from service.checkpoint.memory_tier import MAGIC, MemoryTier
from service.checkpoint.storage import open_storage
from service.supervisor import procs
from tests.helpers import (
    BASELINE_STEPS,
    REPO,
    SupervisedJob,
    assert_bitwise_equal,
    base_env,
    finish,
    free_port,
    losses,
    popen,
    torchrun_cmd,
    trace_lines,
    traced_run,
    wait_for_step,
    weights,
    worker_pids,
)


def assert_same_result_as(baseline: tuple[str, dict[int, float]], url: Path, err: str) -> None:
    ref_url, ref_loss = baseline
    assert_bitwise_equal(weights(ref_url, "model"), weights(str(url), "model"))
    assert_bitwise_equal(weights(ref_url, "ema"), weights(str(url), "ema"))
    # The same loss at every logged step; the step in flight at the kill may have no line at
    # all (rank 0 logs after the per-step all-reduce, which the dead rank never joined, and the
    # memory tier resumes after that step: it is not trained again).
    got = losses(err)
    assert got == {step: ref_loss[step] for step in got} and len(ref_loss) - len(got) <= 1


def assert_resumed_at_the_survivors_step(trace: Path, first: dict[int, int], err: str,
                                         kinds: str = "crash") -> tuple[int, list[dict]]:
    """The restart began at the step after the newest one the first workers' survivor (rank 0)
    completed, took it from the memory tier, and rank 0 reported no completed step trained
    again (``kinds``: the workers' own view of the fault, a regex alternative). Returns that
    step and every traced line."""
    lines = trace_lines(trace)
    survivor_step = max(line["step"] for line in lines if line["pid"] == first[0])
    restarted = [line for line in lines if line["pid"] not in first.values()]
    assert restarted, "the workers should have been restarted"
    assert min(line["step"] for line in restarted) == survivor_step + 1, "a step was lost or redone"
    assert f"resumed from memory tier at step {survivor_step}" in err
    assert re.search(rf"recovered from a ({kinds}): [0-9.]+s .* 0 completed step\(s\) trained again; "
                     r"state from memory", err), err[-3000:]
    return survivor_step, lines


@pytest.mark.timeout(180)
def test_kill9_one_worker_loses_no_step_and_ends_bitwise_equal(baseline, tmp_path):
    """checkpoint.every_steps is larger than the run: the object store holds nothing to resume
    from, and the restart still continues at the step after the survivor's (also with
    checkpoint.resume = "never", which decides the run's first start only)."""
    dirs = traced_run(tmp_path)
    run_id = f"memtier-{uuid.uuid4().hex[:10]}"
    tier = MemoryTier(run_id)  # the default place: /dev/shm
    try:
        proc = popen(torchrun_cmd([f"train.max_steps={BASELINE_STEPS}", "checkpoint.every_steps=100",
                                   dirs.url_arg, "train.step_sleep_s=0.25", 'checkpoint.resume="never"'],
                                  max_restarts=1),
                     env={**dirs.env, "FTDIFF_RUN_ID": run_id})
        wait_for_step(dirs.trace, 5, proc)
        first = worker_pids(dirs.trace)
        os.kill(first[1], signal.SIGKILL)
        code, err = finish(proc)
        assert code == 0, err[-3000:]
        survivor_step, lines = assert_resumed_at_the_survivors_step(dirs.trace, first, err)
        # No step trained twice, except the one the killed worker may have had in flight.
        for rank in (0, 1):
            steps = [line["step"] for line in lines if line["rank"] == rank]
            twice = {s for s in steps if steps.count(s) > 1}
            assert twice <= ({survivor_step + 1} if rank == 1 else set()), (rank, sorted(twice))
        assert_same_result_as(baseline, dirs.url, err)
        assert tier.steps() == [], "the run's snapshots are removed when it finishes"
    finally:
        tier.prune(None)


@pytest.mark.timeout(180)
def test_every_worker_killed_at_once_resumes_from_the_periodic_snapshot(baseline, tmp_path):
    """No survivor is left to leave the state (both workers killed -9 together, as when a
    node's whole process group dies): with checkpoint.memory_every_steps = 2 the restart
    resumes from the newest periodic snapshot — at most two steps back, not from scratch
    (there is no commit) — and the run still ends bitwise equal."""
    dirs = traced_run(tmp_path)
    run_id = f"memtier-{uuid.uuid4().hex[:10]}"
    tier = MemoryTier(run_id)
    try:
        proc = popen(torchrun_cmd([f"train.max_steps={BASELINE_STEPS}", "checkpoint.every_steps=100",
                                   "checkpoint.memory_every_steps=2", dirs.url_arg, "train.step_sleep_s=0.25"],
                                  max_restarts=1),
                     env={**dirs.env, "FTDIFF_RUN_ID": run_id})
        wait_for_step(dirs.trace, 5, proc)
        first = worker_pids(dirs.trace)
        for pid in first.values():
            os.kill(pid, signal.SIGKILL)
        code, err = finish(proc)
        assert code == 0, err[-3000:]
        lines = trace_lines(dirs.trace)
        last = max(line["step"] for line in lines if line["pid"] in first.values())
        resumed = re.search(r"resumed from memory tier at step (\d+)", err)
        assert resumed, err[-3000:]
        step = int(resumed.group(1))
        assert step % 2 == 0 and last - 2 <= step <= last, (step, last)
        restarted = [line["step"] for line in lines if line["pid"] not in first.values()]
        assert min(restarted) == step + 1
        assert_same_result_as(baseline, dirs.url, err)
        assert tier.steps() == [], "the run's snapshots are removed when it finishes"
    finally:
        tier.prune(None)


@pytest.mark.timeout(240)
def test_a_hung_worker_loses_no_step_its_peers_completed(baseline, tmp_path):
    """A SIGSTOPped worker under `ftdiff train`: the supervisor orders the healthy rank out; on
    its way out (its main thread stuck in a collective with the frozen peer) it leaves the last
    step both ranks completed in memory, and the restart resumes there — not at the newest
    commit (there is none: checkpoint.every_steps is larger than the run)."""
    job = SupervisedJob(tmp_path, [f"train.max_steps={BASELINE_STEPS}", "checkpoint.every_steps=100",
                                   "train.step_sleep_s=0.25"])
    job.wait_step(5)
    first = worker_pids(job.trace)
    faults.freeze(first[1])
    code, err = job.finish(200)
    assert code == 0, err[-3000:]
    # The stuck process was SIGKILLed and its peer failed in the collective: the workers saw a
    # crash; the supervisor, which detected the hang, counts it as one.
    assert_resumed_at_the_survivors_step(job.trace, first, err, kinds="crash|hang")
    assert "recovery after a hang: state from memory, 0 step(s) lost" in err
    assert_same_result_as(baseline, Path(job.url), err)


@pytest.mark.timeout(240)
def test_a_lost_node_loses_no_step_the_other_node_completed(baseline, tmp_path):
    """Two simulated nodes of one worker each; node 1's torchrun agent is killed -9 (its worker
    dies with it: every process of the node is gone, and so is anything it could have left).
    Node 0's survivor leaves its last completed step in its own memory tier; the relaunched
    node's rank takes it over the process group, and nothing is trained twice."""
    job = SupervisedJob(tmp_path, [f"train.max_steps={BASELINE_STEPS}", "checkpoint.every_steps=100",
                                   "train.step_sleep_s=0.25", "supervisor.min_nodes=2"], nnodes=2, nproc=1)
    job.wait_step(5)
    first = worker_pids(job.trace)
    os.kill(job.proc.pid, signal.SIGUSR1)  # the workers' leave order, sent to the wrong pid: ignored
    faults.kill9(procs.children(job.proc.pid)[-1])  # the second agent: node 1
    code, err = job.finish(200)
    assert code == 0, err[-3000:]
    # The survivor may leave on the supervisor's order (its view: a hang) or on torchrun's
    # SIGTERM (a crash); the supervisor, which saw the agent die, counts a crash.
    assert_resumed_at_the_survivors_step(job.trace, first, err, kinds="crash|hang")
    assert "recovery after a crash: state from memory, 0 step(s) lost" in err
    assert_same_result_as(baseline, Path(job.url), err)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("delay", [0.0, 0.3])  # before the supervisor noticed the loss, or during the relaunch
def test_a_stop_during_a_lost_node_relaunch_still_commits_the_survivors_steps(tmp_path, delay):
    """SIGTERM to `ftdiff train` right after a node is lost, while the new round is starting:
    the supervisor lets the relaunch finish, so the workers resume from the survivor's memory
    and their emergency checkpoint commits it — exit 43, no completed step lost (another
    `ftdiff train` is another run and could not take those steps from memory)."""
    job = SupervisedJob(tmp_path, ["train.max_steps=400", "checkpoint.every_steps=100",
                                   "train.step_sleep_s=0.25", "supervisor.min_nodes=2"], nnodes=2, nproc=1)
    job.wait_step(5)
    first = worker_pids(job.trace)
    faults.kill9(procs.children(job.proc.pid)[-1])  # the second agent: node 1
    time.sleep(delay)
    job.proc.send_signal(signal.SIGTERM)
    code, err = job.finish(200)
    assert code == 43, err[-3000:]
    survivor_step = max(line["step"] for line in trace_lines(job.trace) if line["pid"] == first[0])
    committed = Catalog(open_storage(str(job.url))).latest()[0]
    assert committed >= survivor_step, (committed, survivor_step)


@pytest.mark.timeout(240)
def test_a_corrupted_snapshot_is_ignored_and_the_run_resumes_from_the_object_store(baseline, tmp_path):
    """The same run started again after a kill -9 (torchrun without restarts, then by hand),
    its survivor's snapshot corrupted in between: the restart takes the newest commit."""
    dirs = traced_run(tmp_path)
    shm = tmp_path / "shm"
    run_id = f"memtier-{uuid.uuid4().hex[:10]}"
    args = [f"train.max_steps={BASELINE_STEPS}", "checkpoint.every_steps=4", dirs.url_arg,
            f'checkpoint.memory_tier_dir="{shm}"']
    env = {**dirs.env, "FTDIFF_RUN_ID": run_id}
    proc = popen(torchrun_cmd(args + ["train.step_sleep_s=0.25"]), env=env)
    wait_for_step(dirs.trace, 5, proc)
    catalog = Catalog(open_storage(str(dirs.url)))
    deadline = time.monotonic() + 60
    while catalog.latest() is None:  # the (async) commit of step 4: slow on a busy machine
        assert time.monotonic() < deadline and proc.poll() is None, "no commit"
        time.sleep(0.05)
    first = worker_pids(dirs.trace)
    os.kill(first[1], signal.SIGKILL)
    code, killed_err = finish(proc)
    assert code != 0
    committed = catalog.latest()[0]
    tier = MemoryTier(run_id, shm)
    left = tier.steps()
    assert len(left) == 1 and left[0] > committed, (left, committed, killed_err[-3000:])
    path = tier.path(left[0])
    data = bytearray(path.read_bytes())
    data[len(MAGIC) + len(data) // 3] ^= 0x40
    path.write_bytes(bytes(data))

    code, err = finish(popen(torchrun_cmd(args), env=env))
    assert code == 0, err[-3000:]
    assert "not using" in err and "payload checksum mismatch" in err
    assert "resumed from memory tier" not in err
    restarted = [line for line in trace_lines(dirs.trace) if line["pid"] not in first.values()]
    assert min(line["step"] for line in restarted) == committed + 1  # from the newest commit
    assert_same_result_as(baseline, dirs.url, killed_err + err)  # losses of both starts
    assert tier.steps() == []


STUCK = """
import os, signal, sys, time
import torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
rank = int(sys.argv[1])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}")
dist.init_process_group("gloo", rank=rank, world_size=2)
from pathlib import Path
from tests.unit.test_memory_tier import Job, recovery
job = Job()
job.step(); job.step(); job.step()
rec = recovery(job, Path({dir!r}), world_size=2)
rec.consistent_at(3)
signal.signal(signal.SIGTERM, lambda *a: None)  # like the trainer: only a flag
rec.watch_signals()
print("ready", flush=True)
if rank == 0:
    dist.all_reduce(torch.ones(1))  # rank 1 never joins: stuck, as with a peer on a lost node
else:
    time.sleep(120)
"""


@pytest.mark.timeout(90)
def test_a_worker_stuck_in_a_collective_leaves_its_state_on_sigterm(tmp_path):
    script = STUCK.format(repo=str(REPO), port=free_port(), dir=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], env=base_env(), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()[-3000:]
        time.sleep(0.5)  # rank 0 is inside the all-reduce now
        procs[0].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while MemoryTier("run-a", tmp_path).steps() != [3]:
            assert time.monotonic() < deadline, "no snapshot after SIGTERM"
            assert procs[0].poll() is None
            time.sleep(0.05)
        assert procs[0].poll() is None  # still stuck in the collective: the watcher wrote it
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
