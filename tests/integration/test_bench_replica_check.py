"""bench/replica_check.py in CI size: two real ranks, the worker's own check, one JSON line with
the check's share of training time (reported, never asserted as a timing)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, base_env


@pytest.mark.timeout(240)
def test_the_replica_check_bench_reports_its_share_of_step_time():
    res = subprocess.run([sys.executable, "bench/replica_check.py", "--preset", "tiny", "--steps", "4",
                          "--checks", "2", "--batch", "2"], env=base_env(), cwd=REPO, capture_output=True,
                         text=True, timeout=220)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["step_s"] > 0 and out["check_s"] > 0 and out["tensors_checked"] > 0
    assert out["check_share_at_default"] == pytest.approx(out["check_s"] / (100 * out["step_s"]))
