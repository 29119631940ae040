"""Runs by name (issue 26): without checkpoint.url a run lives under runs/<run.name>/ — its
checkpoints, TensorBoard events and status together — so two names never share a root or logs,
and `ftdiff runs ls` lists them with their state and newest step."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, TINY, base_env, set_args


def _train(cwd, name: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    args = [a for a in TINY if not a.startswith("logging.tensorboard")] + [
        f'run.name="{name}"', "train.max_steps=3", "checkpoint.every_steps=2", "supervisor.port=0",
        "metrics.port=0", *extra]
    return subprocess.run([sys.executable, "-m", "service.cli", "train", "--nproc-per-node", "1", *set_args(args)],
                          cwd=cwd, env=base_env({"PYTHONPATH": str(REPO), **(env or {})}), capture_output=True,
                          text=True, timeout=200)


@pytest.mark.timeout(400)
def test_two_names_two_roots_separate_logs_and_runs_ls_shows_their_state(tmp_path):
    for name in ("exp-a", "exp-b"):
        res = _train(tmp_path, name)
        assert res.returncode == 0, res.stderr[-2000:]
    failed = _train(tmp_path, "exp-c", "supervisor.max_restarts=0", env={"FTDIFF_FAIL_AT_STEP": "2"})
    assert failed.returncode != 0
    runs = tmp_path / "runs"
    for name in ("exp-a", "exp-b"):
        assert (runs / name / "checkpoints" / "step-000000003" / "manifest.json").is_file()
        assert any((runs / name / "tensorboard").iterdir())  # each run its own event files
    assert not (runs / "ftdiff").exists()  # the default name's root was not touched

    res = subprocess.run([sys.executable, "-m", "service.cli", "runs", "ls", "--json"], cwd=tmp_path,
                         env=base_env({"PYTHONPATH": str(REPO)}), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    listed = {r["name"]: r for r in json.loads(res.stdout)}
    assert {n: (r["state"], r["step"]) for n, r in listed.items()} == {
        "exp-a": ("finished", 3), "exp-b": ("finished", 3), "exp-c": ("failed", None)}
    assert listed["exp-a"]["checkpoint_url"] == "runs/exp-a/checkpoints"
    table = subprocess.run([sys.executable, "-m", "service.cli", "runs", "ls"], cwd=tmp_path,
                           env=base_env({"PYTHONPATH": str(REPO)}), capture_output=True, text=True, timeout=60).stdout
    assert table.splitlines()[0].split() == ["NAME", "STATE", "STEP", "UPDATED", "CHECKPOINTS"]
    assert "exp-b" in table and "3/3" in table
