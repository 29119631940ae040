"""`ftdiff train` reads FTDIFF_OVERRIDES itself, as its workers, --print-config and --dry-run
do: a token or checkpoint URL given there is the one the supervisor uses too."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from service.checkpoint.catalog import Catalog
from service.checkpoint.storage import open_storage
from tests.helpers import REPO, TINY, base_env


@pytest.mark.timeout(180)
def test_ftdiff_train_takes_token_and_root_from_ftdiff_overrides(tmp_path):
    url = tmp_path / "ckpt"
    env_overrides = [*TINY, f'checkpoint.url="{url}"', 'supervisor.token="env-token"', "supervisor.port=0",
                     "metrics.port=0", "supervisor.startup_timeout_s=60", "train.max_steps=50"]
    res = subprocess.run(
        [sys.executable, "-m", "service.cli", "train", "--nproc-per-node", "1", "--set", "train.max_steps=3"],
        env=base_env({"FTDIFF_OVERRIDES": json.dumps(env_overrides), "FTDIFF_TOKEN": ""}),
        cwd=tmp_path, capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, res.stderr[-3000:]
    # the workers' token is the supervisor's: no heartbeat was refused (HTTP Error 401)
    assert "Error 401" not in res.stderr and "Unauthorized" not in res.stderr, res.stderr[-3000:]
    assert Catalog(open_storage(str(url))).latest()[0] == 3  # the root from the env, --set wins for steps
    assert not (tmp_path / "runs").exists()  # nothing at the default root
    assert str(REPO) not in str(url)
