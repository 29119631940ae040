"""One run and one incarnation per checkpoint root, with real processes: a zombie writer
(SIGSTOPped mid-commit, resumed after a newer start committed), SIGKILL of `ftdiff train`,
and a crash after a `never` start under torchrun."""

from __future__ import annotations

import subprocess
import time

import pytest

from service import faults
from service.checkpoint.catalog import Catalog
from service.checkpoint.storage import open_storage
from service.supervisor import procs
from tests.helpers import (
    BASELINE_STEPS,
    REPO,
    SupervisedJob,
    assert_bitwise_equal,
    base_env,
    run,
    single_cmd,
    stop,
    weights,
    why,
    worker_pids,
)


def _stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def _wait_until(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.05)


@pytest.mark.timeout(240)
def test_a_zombie_writer_process_cannot_commit_move_latest_or_delete(tmp_path):
    url = tmp_path / "ckpt"
    common = ["checkpoint.every_steps=2", f'checkpoint.url="{url}"']
    reference = tmp_path / "reference"
    res = run(single_cmd(["train.max_steps=8", "checkpoint.every_steps=2", f'checkpoint.url="{reference}"']))
    assert res.returncode == 0, why(res)

    # The zombie: stalls with its shards written and .metadata not yet (SIGSTOP, for real).
    zombie = subprocess.Popen(single_cmd(["train.max_steps=8", *common]), cwd=REPO, text=True,
                              env=base_env({"FTDIFF_PAUSE_AT": "after_shards:6"}),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_until(lambda: _stopped(zombie.pid) or zombie.poll() is not None, 120, "zombie pauses")
        assert zombie.poll() is None, zombie.stderr.read()[-3000:]
        # A newer start resumes (from step 4), commits 6 and 8 and finishes.
        newer = run(single_cmd(["train.max_steps=8", *common]))
        assert newer.returncode == 0, why(newer)
        catalog = Catalog(open_storage(str(url)))
        before = {name: catalog.storage.read_bytes(f"step-000000006/{name}")
                  for name in catalog.storage.list_dir("step-000000006")}
        assert catalog.pointer_step() == 8
        # The zombie wakes up, tries to finish its commit of 6, trains on, and tries to commit 8.
        faults.thaw(zombie.pid)
        _, err = zombie.communicate(timeout=120)
    finally:
        stop(zombie)
    assert zombie.returncode not in (0, None), "the zombie must not report a committed final step"
    assert "newer start" in err
    assert catalog.pointer_step() == 8
    after = {name: catalog.storage.read_bytes(f"step-000000006/{name}")
             for name in catalog.storage.list_dir("step-000000006")}
    assert sorted(after) == sorted(before), err[-4000:]
    assert after == before
    assert catalog.verify(6) == [] and catalog.verify(8) == []
    assert catalog.manifest(8).incarnation == catalog.manifest(6).incarnation == 2
    assert_bitwise_equal(weights(str(reference), "model"), weights(str(url), "model"))


@pytest.mark.timeout(300)
def test_sigkill_of_ftdiff_train_leaves_no_process_and_a_relaunch_resumes_bitwise_equal(baseline, tmp_path):
    ref_url, _ = baseline
    url = tmp_path / "ckpt"
    args = [f"train.max_steps={BASELINE_STEPS}", "checkpoint.every_steps=4", f'checkpoint.url="{url}"']
    job = SupervisedJob(tmp_path / "first", [*args, "train.step_sleep_s=0.25"])
    try:
        job.wait_step(6)
        tree = procs.descendants(job.proc.pid)
        assert len(tree) >= 3, tree  # the agent and its two workers at least
        faults.freeze(worker_pids(job.trace)[1])  # a stopped worker cannot notice anything itself
        job.proc.kill()
        job.proc.wait(timeout=10)
        _wait_until(lambda: not any(procs.pid_alive(p) for p in tree), 15, "every process of the job ends")
    finally:
        stop(job.proc)
    again = SupervisedJob(tmp_path / "second", args)
    code, err = again.finish(240)
    assert code == 0, err[-3000:]
    assert_bitwise_equal(weights(ref_url, "model"), weights(str(url), "model"))
    assert_bitwise_equal(weights(ref_url, "ema"), weights(str(url), "ema"))


@pytest.mark.timeout(180)
def test_a_second_run_into_a_used_root_exits_2_and_overwrites_nothing(tmp_path):
    url = tmp_path / "ckpt"
    first = run(single_cmd(["train.max_steps=4", "checkpoint.every_steps=2", f'checkpoint.url="{url}"']))
    assert first.returncode == 0, why(first)
    snapshot = {p: p.read_bytes() for p in url.rglob("*") if p.is_file()}
    for change in ('checkpoint.resume="never"', "run.seed=1"):
        second = run(single_cmd(["train.max_steps=8", "checkpoint.every_steps=2", f'checkpoint.url="{url}"',
                                 change]))
        assert second.returncode == 2, why(second)
        assert "Traceback" not in second.stderr
        assert ("never mixes" if "never" in change else "run.seed") in second.stderr
    # The refused starts changed nothing (not even an incarnation record: they fence no one).
    assert {p: p.read_bytes() for p in url.rglob("*") if p.is_file()} == snapshot


@pytest.mark.timeout(300)
def test_an_agent_out_of_restarts_is_relaunched_in_a_fresh_rendezvous_round(baseline, tmp_path):
    """torchrun closes a run id's rendezvous for good when its agent gives up; the supervisor
    relaunches every agent under a new round id, and the run still ends bitwise equal."""
    ref_url, _ = baseline
    url = tmp_path / "ckpt"
    job = SupervisedJob(tmp_path / "job", [f"train.max_steps={BASELINE_STEPS}", "checkpoint.every_steps=4",
                                           f'checkpoint.url="{url}"', "train.step_sleep_s=0.3",
                                           "supervisor.max_restarts=1"])
    try:
        for kill in range(2):  # two crashes: the second one exhausts torchrun's --max-restarts=1
            job.wait_step(3 + kill * 3)
            before = worker_pids(job.trace)
            faults.kill9(before[1])
            if kill == 0:
                _wait_until(lambda: worker_pids(job.trace) != before, 60, "torchrun restarts the worker")
        code, err = job.finish(240)
    finally:
        stop(job.proc)
    assert code == 0, err[-3000:]
    assert "rendezvous round 1" in err
    assert_bitwise_equal(weights(ref_url, "model"), weights(str(url), "model"))


@pytest.mark.timeout(240)
def test_ftdiff_train_stops_at_once_with_exit_2_when_its_workers_refuse_to_start(tmp_path):
    """A refusal is no crash: torchrun would retry it and the supervisor relaunch it until both
    gave up; the worker's goodbye says so instead. Here one only the workers can see (the launcher
    refuses changed settings itself, but does not read the data): the image folder grew."""
    from PIL import Image

    url, images = tmp_path / "ckpt", tmp_path / "images"
    images.mkdir()
    for i in range(5):
        Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(images / f"{i}.png")
    data = ['data.kind="folder"', f'data.url="{images}"']
    first = run(single_cmd(["train.max_steps=2", "checkpoint.every_steps=2", f'checkpoint.url="{url}"', *data]))
    assert first.returncode == 0, why(first)
    Image.new("RGB", (16, 16)).save(images / "5.png")
    snapshot = {p: p.read_bytes() for p in url.rglob("*") if p.is_file()}
    job = SupervisedJob(tmp_path / "job", ["train.max_steps=8", f'checkpoint.url="{url}"', *data,
                                           "supervisor.max_restarts=5"])
    started = time.monotonic()
    code, err = job.finish(200)
    assert code == 2, err[-3000:]
    assert "data.length" in err and "not restarting" in err
    assert time.monotonic() - started < 60  # not 5 torchrun restarts x 5 relaunches
    assert {p: p.read_bytes() for p in url.rglob("*") if p.is_file()} == snapshot
