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


def test_a_start_that_lost_the_run_to_a_newer_one_leaves_its_status_alone(tmp_path):
    older = RunStatus(tmp_path / "d", "d", "runs/d/checkpoints", 10)
    older.started()
    newer = RunStatus(tmp_path / "d", "d", "runs/d/checkpoints", 10)
    newer.started()
    newer.body["pid"] = os.getpid() + 1  # another process's status now
    newer._write()
    older.ended(EXIT_USAGE)  # the older start was fenced off and refused
    assert read_status(tmp_path / "d")["pid"] == os.getpid() + 1


def test_a_refused_restart_puts_the_earlier_status_back(tmp_path):
    first = RunStatus(tmp_path / "e", "e", "runs/e/checkpoints", 6)
    first.started()
    first.ended(EXIT_OK)
    again = RunStatus(tmp_path / "e", "e", "runs/e/checkpoints", 7)
    again.started()
    again.ended(EXIT_USAGE)
    body = read_status(tmp_path / "e")
    assert (body["state"], body["max_steps"]) == ("finished", 6)


def test_names_that_look_alike_get_folders_of_their_own():
    from service.config.schema import run_folder

    assert run_folder("exp-b") == "exp-b" and run_folder("ftdiff") == "ftdiff"
    odd = ["a b", "a-b", "日本", "中国", "???", "..", "run", "x" * 120, "x" * 121]
    assert len({run_folder(n) for n in odd}) == len(odd)
    assert all(".." not in run_folder(n) and "/" not in run_folder(n) for n in odd)


def test_status_keeps_the_root_absolute_and_without_secrets(tmp_path):
    status = RunStatus(tmp_path / "f", "f", "runs/f/checkpoints", 3)
    assert status.body["checkpoint_url"] == os.path.abspath("runs/f/checkpoints")
    remote = RunStatus(tmp_path / "g", "g", "s3://user:TOPSECRET@bucket/g", 3)
    assert "TOPSECRET" not in remote.body["checkpoint_url"]
