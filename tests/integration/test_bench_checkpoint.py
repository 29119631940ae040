"""bench/checkpoint.py in CI size against the real S3 server: two real ranks save, commit and
load through ftdiff and through DCP, the raw boto3 transfer is measured in the same run, and
one JSON line carries every ratio the issue names (timings are reported, never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, base_env


@pytest.mark.timeout(400)
def test_the_checkpoint_bench_reports_the_ratios_against_the_raw_transfer(s3_bucket, s3_server):
    res = subprocess.run([sys.executable, "bench/checkpoint.py", "--target", f"{s3_bucket}/ck", "--mb", "8",
                          "--repeats", "1", "--rss-saves", "1", "--batch", "2"],
                         env=base_env(s3_server), cwd=REPO, capture_output=True, text=True, timeout=380)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["target"] == "s3"
    against_raw = ("commit_throughput_vs_raw_upload", "fastest_commit_vs_fastest_raw_upload",
                   "load_throughput_vs_raw_download", "dcp_sync_throughput_vs_raw_upload")
    # (The stall ratios may round to 0.0: a stall of a millisecond against a save of seconds.)
    assert all(out["ratios"][name] > 0 for name in against_raw), out["ratios"]
    # The raw times are medians of repeats at the best concurrency, never faster than the fastest.
    assert out["raw_upload_min_s"] <= out["raw_upload_s"] and out["raw_download_min_s"] <= out["raw_download_s"]
    assert out["commit_min_s"] <= out["commit_s"]
