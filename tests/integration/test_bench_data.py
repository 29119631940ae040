"""bench/data.py in CI size against the real S3 server: it runs every configuration and ends
with the JSON line the issue names (timings are reported, never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, base_env


@pytest.mark.timeout(300)
def test_the_data_bench_reports_every_configuration_and_the_ratios(s3_bucket, s3_server):
    res = subprocess.run([sys.executable, "bench/data.py", "--target", f"{s3_bucket}/bench", "--images", "24",
                          "--side", "32", "--batch", "4", "--batches", "3", "--preset", "tiny",
                          "--shard-size", "20kB"], env=base_env(s3_server), cwd=REPO, capture_output=True,
                         text=True, timeout=280)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    wanted = {f"{kind}_{where}_w{w}" for kind in ("folder", "webdataset") for where in ("local", "s3") for w in (0, 2)}
    assert set(out["images_per_s"]) == wanted and all(v > 0 for v in out["images_per_s"].values())
    assert {"webdataset_vs_folder_s3", "webdataset_s3_vs_local"} <= set(out["ratios"])
