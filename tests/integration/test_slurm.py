"""deploy/slurm/ftdiff.sbatch on a real Slurm cluster (tests/slurm.py: munge, slurmctld and two
slurmd on this host): the job trains on 2 nodes, `scancel --signal=TERM` makes the workers
commit an emergency checkpoint, the job requeues itself, and the requeued job resumes from that
checkpoint and finishes."""

from __future__ import annotations

import json
import sys
import time

import pytest

from tests.helpers import REPO, TINY, base_env, free_port, trace_lines, traced_run
from tests.slurm import slurm_available, slurm_cluster

pytestmark = [pytest.mark.timeout(420),
              pytest.mark.skipif(slurm_available() is not None, reason=str(slurm_available()))]

STEPS = 60


def _wait(what: str, ready, timeout: float = 180):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = ready()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"no {what} after {timeout:.0f} s")


def test_a_sigterm_saves_requeues_and_the_requeued_job_resumes_and_finishes(tmp_path):
    from service.checkpoint.catalog import Catalog
    from service.checkpoint.storage import open_storage

    run = traced_run(tmp_path)
    overrides = TINY + [f"train.max_steps={STEPS}", "checkpoint.every_steps=1000", "train.step_sleep_s=0.2",
                        f'checkpoint.url="{run.url}"', "supervisor.heartbeat_interval_s=0.5"]
    env = base_env({
        **run.env, "FTDIFF_OVERRIDES": json.dumps(overrides), "FTDIFF_PYTHON": sys.executable,
        "FTDIFF_CONFIG": "tiny", "NPROC_PER_NODE": "1", "FTDIFF_HEAD_ADDR": "127.0.0.1", "GRACE_S": "60",
        "RDZV_PORT": str(free_port()), "SUPERVISOR_PORT": str(free_port()), "METRICS_PORT": str(free_port()),
    })
    with slurm_cluster(tmp_path / "slurm") as cluster:
        out = tmp_path / "job.out"
        submitted = cluster.run("sbatch", "--parsable", f"--chdir={REPO}", f"--output={out}",
                                str(REPO / "deploy/slurm/ftdiff.sbatch"), env=env)
        assert submitted.returncode == 0, submitted.stderr
        job = submitted.stdout.strip().split(";")[0]

        def trained_5() -> bool:
            if cluster.job_state(job) in ("COMPLETED", "FAILED", "CANCELLED"):
                raise AssertionError(f"the job ended early:\n{out.read_text()[-4000:]}")
            return any(line["step"] >= 5 for line in trace_lines(run.trace))

        _wait("step 5", trained_5)
        assert cluster.run("scancel", "--signal=TERM", job).returncode == 0
        catalog = Catalog(open_storage(str(run.url)))
        saved = _wait("an emergency commit", lambda: catalog.latest())[0]
        assert 5 <= saved < STEPS  # only the emergency save could have committed (every_steps=1000)
        _wait("the requeue", lambda: cluster.job_field(job, "Restarts") == "1")
        _wait("the requeued job's end", lambda: cluster.job_state(job) in ("COMPLETED", "FAILED"), timeout=240)
        log = out.read_text()
        assert cluster.job_state(job) == "COMPLETED", log[-4000:]

    assert catalog.latest()[0] == STEPS
    assert "requeueing" in log and "start 2" in log
    # The requeued job went on from the emergency commit: its rank 0 (a process of its own,
    # so a trace file of its own) trained from the step after it to the end.
    starts = sorted(run.trace.glob("rank0-*.jsonl"), key=lambda f: f.stat().st_mtime)
    assert len(starts) == 2, starts
    first, second = ([json.loads(line)["step"] for line in f.read_text().splitlines() if line.strip()]
                     for f in starts)
    assert max(first) >= saved
    assert second == list(range(saved + 1, STEPS + 1)), (saved, second)
