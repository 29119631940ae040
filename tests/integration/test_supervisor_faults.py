"""The supervised local job (`ftdiff train`) under real faults: a crash loop and SIGTERM to
the supervisor here; worker crash, hang (with its detection bound), lost node, storage outage
and preemption together in test_campaign.py; shrinking to fewer nodes (min nodes 1) in
test_multihost.py."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from service.checkpoint.catalog import Catalog
from service.checkpoint.storage import open_storage
from service.errors import EXIT_PREEMPTED
from tests.helpers import (
    REPO,
    TINY,
    base_env,
    free_port,
    set_args,
    stop,
    trace_lines,
    traced_run,
    wait_for_step,
)

pytestmark = pytest.mark.multiprocess
HANG_TIMEOUT = 4.0
INTERVAL = 0.5


class Job:
    """A supervised job: `ftdiff train` in a subprocess, with its trace and metrics endpoint."""

    def __init__(self, tmp: Path, overrides: list[str], nnodes: int = 1, nproc: int = 2,
                 env: dict[str, str] | None = None):
        dirs = traced_run(tmp)
        self.trace, self.url = dirs.trace, str(dirs.url)
        self.metrics_port = free_port()
        args = TINY + [
            dirs.url_arg, "supervisor.port=0", f"metrics.port={self.metrics_port}",
            f"supervisor.hang_timeout_s={HANG_TIMEOUT}", f"supervisor.heartbeat_interval_s={INTERVAL}",
            *overrides,
        ]
        cmd = [sys.executable, "-m", "service.cli", "train", "--nnodes", str(nnodes),
               "--nproc-per-node", str(nproc), "--log-format", "json", *set_args(args)]
        self.proc = subprocess.Popen(cmd, env=base_env({**dirs.env, **(env or {})}),
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_step(self, step: int) -> None:
        try:
            wait_for_step(self.trace, step, self.proc)
        except TimeoutError as e:
            stop(self.proc)  # then its log can be read to the end
            raise AssertionError(f"{e}; supervisor log:\n{self.proc.stderr.read()[-6000:]}") from None

    def metric(self, name: str) -> float:
        if self.proc.poll() is not None:
            raise AssertionError(f"supervisor exited ({self.proc.returncode}): {self.proc.stderr.read()[-3000:]}")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def finish(self, timeout: float = 200) -> tuple[int, str]:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(self.proc)
            raise
        return self.proc.returncode, err


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
