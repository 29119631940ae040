"""Storage mistakes users make — missing bucket (exit 2: a wrong checkpoint.url), wrong
credentials or a dead endpoint (exit 3: storage unreachable or access denied) — give a message
naming the URL, never a secret, and nothing is written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.errors import EXIT_STORAGE, EXIT_USAGE
from tests.helpers import (
    REPO,
    base_env,
    free_port,
    run,
    single_cmd,
)

SECRET = "sup3r-secret-value-do-not-print"


def _env(endpoint: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG", "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}


def _check(res: subprocess.CompletedProcess, needle: str, code: int, secret: str = SECRET) -> None:
    assert res.returncode == code, res.stderr[-2000:]
    assert needle in res.stderr, res.stderr[-2000:]
    assert secret not in res.stderr + res.stdout
    assert "Traceback" not in res.stderr


@pytest.mark.timeout(120)
def test_missing_bucket(s3_server):
    res = run(single_cmd(["train.max_steps=2", 'checkpoint.url="s3://no-such-bucket-ftdiff/run"']), env=s3_server)
    _check(res, "no-such-bucket-ftdiff", EXIT_USAGE, secret=s3_server["AWS_SECRET_ACCESS_KEY"])
    assert "does not exist" in res.stderr


@pytest.mark.timeout(120)
def test_wrong_credentials(s3, s3_bucket):
    """The real server checks signatures: an access key it does not know is refused."""
    res = run(single_cmd(["train.max_steps=2", f'checkpoint.url="{s3_bucket}/run"']), env=_env(s3.url))
    _check(res, f"{s3_bucket}/run", EXIT_STORAGE)
    assert "access denied" in res.stderr and "credentials" in res.stderr


@pytest.mark.timeout(120)
def test_unreachable_endpoint_fails_fast_in_the_supervisor(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    res = subprocess.run(
        [sys.executable, "-m", "service.cli", "train", "--set", 'checkpoint.url="s3://bucket/run"',
         "--set", "supervisor.port=0", "--set", "metrics.port=0"],
        env=base_env(_env(dead)), cwd=REPO, capture_output=True, text=True, timeout=100)
    _check(res, "unreachable", EXIT_STORAGE)
