"""Leaving a bad node out (issue 25, supervisor.exclude_*): `ftdiff train` with simulated nodes
of one rank each. A node whose replica diverged from the majority's (three nodes, so that there
is one), or whose rank stays slow (two nodes), is left out: the job is relaunched on the others
and finishes there, from its own checkpoints."""

from __future__ import annotations

import os
import re

import pytest

from tests.helpers import SupervisedJob, trace_lines

COMMON = ["checkpoint.every_steps=3", "train.global_batch_size=12"]  # 12: for 3, 2 and 1 ranks


def _run(tmp_path, name: str, nnodes: int, settings: list[str], env: dict[str, str]) -> SupervisedJob:  # type: ignore[no-untyped-def]
    job = SupervisedJob(tmp_path / name, COMMON + settings, nnodes=nnodes, nproc=1,
                        env={**env, "FTDIFF_RUN_ID": f"{name}-{os.getpid()}"})
    code, err = job.finish(240)
    assert code == 0, err[-4000:]
    return job


def _world_sizes_in_order(job: SupervisedJob) -> list[int]:
    """The world size of each step as last trained (a rolled-back or relaunched step counts once)."""
    by_step = {line["step"]: line["world_size"] for line in sorted(trace_lines(job.trace), key=lambda l: l["time"])}
    return [by_step[s] for s in sorted(by_step)]


def _node_of_first_rank(job: SupervisedJob, rank: int) -> str:
    """The node the job's first start placed ``rank`` on (torchrun numbers ranks by joining order)."""
    lines = sorted(trace_lines(job.trace), key=lambda line: line["time"])
    return next(line["node"] for line in lines if line["rank"] == rank)


@pytest.mark.timeout(300)
def test_a_node_whose_replica_diverged_is_left_out(tmp_path):
    job = _run(tmp_path, "diverged", 3, ["train.max_steps=16", "divergence.replica_check_every=4",
                                         "supervisor.min_nodes=2", "supervisor.exclude_diverged_nodes=true"],
               {"FTDIFF_CORRUPT_PARAM_AT_STEP": "7:1"})
    log, bad = job.log(), _node_of_first_rank(job, 1)  # the rank whose bit was flipped
    assert f"node {bad}: diverged replica: leaving it out, relaunching on 2 node(s)" in log, log[-4000:]
    assert log.count(": diverged replica: leaving it out") == 1
    # The rollback finished first, and the relaunch resumed from state taken after it: the commit
    # it went back to, or a memory-tier copy of a step trained again after it (a slow supervisor
    # may let the survivors get that far) -- never a copy of the diverged steps.
    rolled_back = log.index("rolled back to step")
    assert rolled_back < log.index(": diverged replica: leaving it out"), log[-4000:]
    from_memory = re.search(r"resumed from memory tier at step (\d+)", log)
    if from_memory:  # that copy was left after the rollback (a step may leave before its line is logged)
        left = re.compile(rf"memory tier: (left step {from_memory[1]} |step {from_memory[1]} already left)")
        after = left.search(log, rolled_back)
        assert after is not None and after.start() < from_memory.start(), f"resumed a pre-rollback copy: {log[-4000:]}"
    sizes = _world_sizes_in_order(job)
    assert len(sizes) == 16 and sizes[0] == 3 and sizes[-1] == 2, sizes
    assert sizes == sorted(sizes, reverse=True)  # never back to two nodes


@pytest.mark.timeout(300)
def test_a_persistently_slow_node_is_left_out(tmp_path):
    job = _run(tmp_path, "slow", 2, ["train.max_steps=24", "supervisor.min_nodes=1", "supervisor.exclude_slow_after_s=2"],
               {"FTDIFF_SLOW_RANK": "1:0.3"})
    log, slow = job.log(), _node_of_first_rank(job, 1)
    assert f"node {slow}: slow: leaving it out, relaunching on 1 node(s)" in log, log[-4000:]
    sizes = _world_sizes_in_order(job)
    assert len(sizes) == 24 and sizes[0] == 2 and sizes[-1] == 1, sizes
