"""`python -m service.node.agent` (the pods' torchrun): a worker error no restart can fix
ends the pod with that error's code, so the Job's podFailurePolicy can fail the Job at once."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from service.node.agent import exit_code_for
from tests.helpers import REPO, base_env


def test_no_retry_codes_win_over_crashes():
    assert exit_code_for([1, 2]) == 2
    assert exit_code_for([-9, 3]) == 3
    assert exit_code_for([46]) == 46
    assert exit_code_for([1, -9, 43]) == 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("worker", "agent"), [(0, 0), (2, 2), (5, 1)])
def test_the_agent_exits_with_the_workers_no_retry_code(tmp_path, worker, agent):
    script = tmp_path / "exit.py"
    script.write_text("import sys\nsys.exit(int(sys.argv[1]))\n")
    res = subprocess.run([sys.executable, "-m", "service.node.agent", "--nnodes=1", "--nproc-per-node=1",
                          "--max-restarts=1", str(script), str(worker)],
                         env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=110)
    assert res.returncode == agent, res.stderr[-2000:]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("old", ["service.train.agent", "service.train.zygote"])
def test_the_old_module_names_still_run(old):
    """Manifests written before the node package start `python -m service.train.agent`."""
    res = subprocess.run([sys.executable, "-m", old, "--help"], capture_output=True, text=True, timeout=50)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage" in res.stdout.lower()


@pytest.mark.timeout(120)
def test_a_stop_signal_while_the_agent_exits_ends_it_quietly_with_its_code(tmp_path):
    """The supervisor ends a refused start with SIGTERM to its agents, which may already be on
    their way out: torch's handler, still installed, raised in an exit finalizer and printed a
    traceback under the user's one-line error. The agent now leaves at once, with its code."""
    worker = tmp_path / "exit.py"
    worker.write_text("import sys\nsys.exit(2)\n")
    exiting = tmp_path / "exiting"
    wrapper = tmp_path / "agent.py"
    wrapper.write_text(  # an interpreter shutdown slow enough for the signal to land in it
        "import atexit, pathlib, sys, time\n"
        f"atexit.register(lambda: (pathlib.Path({str(exiting)!r}).touch(), time.sleep(5)))\n"
        "from service.node.agent import main\n"
        "sys.exit(main())\n")
    agent = subprocess.Popen([sys.executable, str(wrapper), "--nnodes=1", "--nproc-per-node=1", "--max-restarts=1",
                              str(worker)], env=base_env(), cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1000):  # bounded: 100 s
            if exiting.exists() or agent.poll() is not None:
                break
            time.sleep(0.1)
        assert exiting.exists(), "the agent never reached its exit"
        agent.send_signal(signal.SIGTERM)
        _, stderr = agent.communicate(timeout=30)
    finally:
        agent.kill()
    assert agent.returncode == 2, stderr[-2000:]
    assert "Traceback" not in stderr and "SignalException" not in stderr, stderr[-2000:]
