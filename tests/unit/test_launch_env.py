"""The launch environment is read in one place, into one typed object."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from service.dist import run_id_of
from service.errors import UserError
from service.launch_env import LaunchEnv, launcher_env, worker_agent_env

SERVICE = Path(__file__).resolve().parents[2] / "service"
pytestmark = pytest.mark.timeout(30)


def test_only_launch_env_and_the_test_hooks_read_ftdiff_variables():
    reads = re.compile(r"""environ(?:\.get)?\s*[\[(]\s*b?["']FTDIFF_|getenv\(\s*["']FTDIFF_""")
    allowed = {"launch_env.py", "faults.py"}  # faults.py: the test hooks, by design
    offenders = [str(p.relative_to(SERVICE)) for p in SERVICE.rglob("*.py")
                 if p.name not in allowed and reads.search(p.read_text())]
    assert offenders == []


def test_what_the_launcher_sets_is_what_a_worker_reads():
    env = launcher_env(node=3, supervisor_url="http://127.0.0.1:9", token="t", run_id="r", supervisor_pid=77)
    launch = LaunchEnv.read(env)
    assert (launch.node, launch.supervisor_url, launch.token, launch.run_id, launch.supervisor_pid) == (
        "3", "http://127.0.0.1:9", "t", "r", 77)
    assert launch.under_local_supervisor
    assert not LaunchEnv.read({}).under_local_supervisor
    assert LaunchEnv.read({"GROUP_RANK": "2"}).node == "2"  # plain torchrun


def test_a_forked_worker_names_its_agent_and_its_children_do_not_inherit_that():
    mine = LaunchEnv.read(worker_agent_env(os.getpid(), 4242))
    assert mine.agent_pid == 4242
    # The same variable in a process the worker forked (another pid): its real parent.
    theirs = LaunchEnv.read(worker_agent_env(os.getpid() + 1, 4242))
    assert theirs.agent_pid == os.getppid()
    assert LaunchEnv.read({"FTDIFF_WORKER_AGENT": "junk"}).agent_pid == os.getppid()


def test_the_run_is_named_after_the_agent_when_torchrun_names_nothing():
    assert run_id_of(LaunchEnv.read({"FTDIFF_RUN_ID": "job-1"})) == "job-1"
    assert run_id_of(LaunchEnv.read({"TORCHELASTIC_RUN_ID": "rdzv-7"})) == "rdzv-7"
    assert run_id_of(LaunchEnv.read({})) is None  # started by hand: a run of its own
    own = run_id_of(LaunchEnv.read({"TORCHELASTIC_RUN_ID": "none"}))
    forked = run_id_of(LaunchEnv.read({"TORCHELASTIC_RUN_ID": "none", **worker_agent_env(os.getpid(), os.getppid())}))
    assert own is not None and own == forked and f"-{os.getppid()}-" in own


def test_the_old_collective_timeout_variable_still_wins_and_a_bad_one_is_named():
    assert LaunchEnv.read({}).collective_timeout(300.0) == 300.0
    assert LaunchEnv.read({"FTDIFF_COLLECTIVE_TIMEOUT_S": "42"}).collective_timeout(300.0) == 42.0
    for bad in ("soon", "0", "-5", "nan", "inf"):
        with pytest.raises(UserError, match="FTDIFF_COLLECTIVE_TIMEOUT_S"):
            LaunchEnv.read({"FTDIFF_COLLECTIVE_TIMEOUT_S": bad}).collective_timeout(300.0)
