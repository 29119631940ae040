"""Storage mistakes users make — missing bucket (exit 2: a wrong checkpoint.url), wrong
credentials or a dead endpoint (exit 3: storage unreachable or access denied) — give a message
naming the URL, never a secret, and nothing is written. The read commands (``ckpt``, ``export``)
give the same exit codes in one line, and read-only credentials may read but not train."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from service.checkpoint.storage import open_storage
from service.checkpoint.storage_check import check_reachable
from service.errors import EXIT_FAILURE, EXIT_OK, EXIT_STORAGE, EXIT_USAGE, StorageError
from tests.helpers import (
    REPO,
    base_env,
    free_port,
    one_line,
    run,
    single_cmd,
)
from tests.helpers import ftdiff_inprocess as ftdiff

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


# -- exit codes of the read commands ------------------------------------------------------------
@pytest.mark.timeout(120)
def test_dead_endpoint_is_exit_3_in_one_line(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    for argv in (["ckpt", "ls", "s3://bucket/run"], ["ckpt", "verify", "s3://bucket/run/step-150"],
                 ["export", "s3://bucket/run", "--format", "safetensors", "--out", str(tmp_path / "u.st")]):
        res = ftdiff(*argv, "--endpoint-url", dead)
        assert res.returncode == EXIT_STORAGE, res.stderr
        assert "unreachable" in one_line(res.stderr)
    # The same from a real process: nothing but that line on stderr (no library log noise).
    res = subprocess.run([sys.executable, "-m", "service.cli", "ckpt", "ls", "s3://bucket/run",
                          "--endpoint-url", dead], env=base_env(), capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == EXIT_STORAGE and "unreachable" in one_line(res.stderr)


@pytest.mark.timeout(60)
def test_missing_root_or_bucket_is_exit_1_existing_empty_bucket_is_not(s3_bucket):
    res = ftdiff("ckpt", "ls", f"{s3_bucket}/no-such-run")
    assert res.returncode == EXIT_FAILURE and "no such checkpoint root" in one_line(res.stderr)
    res = ftdiff("ckpt", "ls", "s3://no-such-bucket-ftdiff-12/run")
    assert res.returncode == EXIT_FAILURE and "no such checkpoint root" in one_line(res.stderr)
    res = ftdiff("ckpt", "ls", s3_bucket)
    assert res.returncode == EXIT_OK and res.stdout.strip() == "(no checkpoints)"


@pytest.fixture(scope="module")
def ro_bucket(s3) -> str:
    """A bucket made by the read-write identity; the server's read-only identity may list and
    read it but not write (SeaweedFS's s3.json identities: no emulator IAM policy involved)."""
    import boto3

    name = f"ro-bucket-{uuid.uuid4().hex[:8]}"
    env = s3.env()
    boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1", aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=name)
    return name


@pytest.mark.timeout(120)
def test_unknown_credentials_are_exit_3(s3, ro_bucket, monkeypatch):
    for k, v in {**s3.env(), "AWS_ACCESS_KEY_ID": "AKIAUNKNOWNUNKNOWN", "AWS_SECRET_ACCESS_KEY": SECRET}.items():
        monkeypatch.setenv(k, v)
    res = ftdiff("ckpt", "ls", f"s3://{ro_bucket}/run")
    line = one_line(res.stderr)
    assert res.returncode == EXIT_STORAGE and "access denied" in line and SECRET not in line


@pytest.mark.timeout(180)
def test_read_only_credentials_read_but_fail_training_at_start_up(s3, ro_bucket, monkeypatch):
    env = s3.env(read_only=True)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    storage = open_storage(f"s3://{ro_bucket}/run")
    check_reachable(storage, write=False)  # the read-only commands may use them
    res = ftdiff("ckpt", "ls", f"s3://{ro_bucket}")
    assert res.returncode == EXIT_OK and res.stdout.strip() == "(no checkpoints)", res.stderr
    with pytest.raises(StorageError, match="write access denied"):
        check_reachable(storage)
    # A worker refuses to start (exit 3) instead of failing at its first save.
    res = run(single_cmd(["train.max_steps=2", f'checkpoint.url="s3://{ro_bucket}/run"']), env=env, timeout=120)
    assert res.returncode == EXIT_STORAGE, res.stderr[-2000:]
    assert "write access denied" in res.stderr and "Traceback" not in res.stderr
    assert env["AWS_SECRET_ACCESS_KEY"] not in res.stderr + res.stdout
