"""status.json: what `ftdiff runs ls` reads about a run's state."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from service.supervisor.run_status import RunStatus, read_status

pytestmark = pytest.mark.timeout(30)


def test_started_then_ended_says_finished_or_failed(tmp_path):
    status = RunStatus(tmp_path / "a", "a", "runs/a/checkpoints", 10)
    status.started()
    body = read_status(tmp_path / "a")
    assert body["state"] == "running" and body["pid"] == os.getpid()
    status.ended(EXIT_OK)
    assert read_status(tmp_path / "a")["state"] == "finished"
    status.ended(EXIT_FAILURE)
    body = read_status(tmp_path / "a")
    assert body["state"] == "failed" and body["exit_code"] == EXIT_FAILURE


def test_a_refused_first_start_leaves_nothing_behind(tmp_path):
    status = RunStatus(tmp_path / "b", "b", "runs/b/checkpoints", 10)
    status.started()
    status.ended(EXIT_USAGE)
    assert not (tmp_path / "b").exists()


def test_running_with_its_supervisor_gone_reads_as_failed(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    status = RunStatus(tmp_path / "c", "c", "runs/c/checkpoints", 10)
    status.started()
    status.body["pid"] = gone.pid
    status._write()
    body = read_status(tmp_path / "c")
    assert body["state"] == "failed" and "supervisor is gone" in body["why"]
