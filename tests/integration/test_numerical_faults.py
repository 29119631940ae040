"""Faults that do not crash, under `ftdiff train` with 2 ranks (issue 25): a NaN loss on one
rank skips that update on every rank, the run finishes with finite weights, and the skip is
counted on the supervisor's /metrics."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import SupervisedJob, weights


@pytest.mark.timeout(200)
def test_a_nan_on_one_rank_skips_the_update_on_both_and_the_run_finishes(tmp_path):
    job = SupervisedJob(tmp_path, ["train.max_steps=8", "checkpoint.every_steps=4", "train.step_sleep_s=0.3"],
                        env={"FTDIFF_NAN_AT_STEP": "3:1", "FTDIFF_RUN_ID": f"nan-{os.getpid()}"})
    job.wait_step(6)
    skipped = job.metric("ftdiff_nonfinite_steps_total")
    code, err = job.finish(120)
    assert code == 0, err[-3000:]
    assert skipped == 2  # rank 0 and rank 1 each skipped step 3 (DDP averaged rank 1's NaN into both)
    final = weights(job.url, "model")
    assert all(torch.isfinite(v).all() for v in final.values())
    assert "Traceback" not in err


@pytest.mark.timeout(200)
def test_a_slow_rank_is_named_by_its_relative_speed(tmp_path):
    """FTDIFF_SLOW_RANK=1:0.3: rank 1 computes 0.3 s longer per step. Its peer waits for it in
    the gradient all-reduce, which the timed section leaves out: rank 0 stays the fastest, and
    its communication time (the wait) is the long one."""
    job = SupervisedJob(tmp_path, ["train.max_steps=14", "checkpoint.every_steps=100"],
                        env={"FTDIFF_SLOW_RANK": "1:0.3"})
    job.wait_step(10)
    fast = job.metric('ftdiff_rank_relative_speed{rank="0"}')
    slow = job.metric('ftdiff_rank_relative_speed{rank="1"}')
    compute = [job.metric(f'ftdiff_rank_compute_seconds{{rank="{r}"}}') for r in (0, 1)]
    comm = [job.metric(f'ftdiff_rank_comm_seconds{{rank="{r}"}}') for r in (0, 1)]
    code, err = job.finish(120)
    assert code == 0, err[-3000:]
    assert fast == 1.0 and 0 < slow < 0.5, (fast, slow)
    assert compute[1] > compute[0] + 0.2, compute
    assert comm[0] > comm[1] + 0.15, comm  # rank 0 waits in the all-reduce for rank 1
