"""On a real S3 server (SeaweedFS on loopback): image folders with DataLoader workers,
and the exit codes of a dead endpoint, unknown and read-only credentials."""

from __future__ import annotations

import io
import subprocess
import sys
import uuid

import pytest
import torch

from service.checkpoint.storage import open_storage
from service.checkpoint.storage_check import check_reachable
from service.errors import EXIT_FAILURE, EXIT_OK, EXIT_STORAGE, StorageError
from tests.helpers import base_env, free_port, one_line, run, single_cmd
from tests.helpers import ftdiff_inprocess as ftdiff

SECRET = "ro-secret-" + uuid.uuid4().hex


# -- an image folder on S3 with DataLoader worker processes -------------------------------------
@pytest.mark.timeout(120)
def test_s3_folder_with_workers_gives_the_same_samples(s3_bucket):
    import s3fs
    from PIL import Image

    from service.data.folder import FolderSource
    from service.data.stream import TrainingSamples, build_loader

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for i in range(10):
        buf = io.BytesIO()
        Image.new("RGB", (12, 10), (20 * i, 255 - 20 * i, 7 * i)).save(buf, format="PNG")
        fs.pipe_file(f"{s3_bucket[5:]}/imgs/{i:02d}.png", buf.getvalue())
    fs.pipe_file(f"{s3_bucket[5:]}/imgs/05.png", b"not a png")  # one bad file, skipped
    src = FolderSource(f"{s3_bucket}/imgs", 8, on_bad_image="skip")  # lists + decodes in this process
    samples = TrainingSamples(src, seed=0, num_timesteps=100, hflip=True)
    batches = {}
    for workers in (0, 2):
        # Before the fix, a worker reused the parent's s3fs client: "This class is not fork-safe".
        loader = build_loader(samples, start_position=3, num_steps=4, global_batch=4, rank=0,
                              world_size=1, num_workers=workers)
        batches[workers] = list(loader)
    assert len(batches[0]) == len(batches[2]) == 4
    for a, b in zip(batches[0], batches[2]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    flagged = torch.cat([b["bad_image"] for b in batches[2]])
    indices = torch.cat([b["source_index"] for b in batches[2]])
    assert torch.equal(flagged, indices == 5)


@pytest.mark.timeout(180)
def test_loader_workers_on_s3_leave_no_asyncio_noise(s3_bucket, s3_server, tmp_path):
    """A forked loader worker replaced the s3fs client it inherited; collected there, the client's
    finalizer closed the parent's session from the worker's loop: "Task exception was never
    retrieved ... attached to a different loop" in every run (SeaweedFS, issue 21)."""
    import s3fs
    from PIL import Image

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for i in range(16):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (15 * i, 9 * i, 200 - 9 * i)).save(buf, format="PNG")
        fs.pipe_file(f"{s3_bucket[5:]}/set/{'ab'[i % 2]}/{i:02d}.png", buf.getvalue())
    res = run(single_cmd(["train.max_steps=6", 'data.kind="folder"', f'data.url="{s3_bucket}/set"',
                          "data.num_workers=2", f'checkpoint.url="{tmp_path / "ckpt"}"']), env=s3_server, timeout=150)
    assert res.returncode == EXIT_OK, res.stderr[-2000:]
    assert "Task exception" not in res.stderr and "different loop" not in res.stderr, res.stderr[-2000:]


# -- exit codes of the read commands ------------------------------------------------------------
@pytest.mark.timeout(120)
def test_dead_endpoint_is_exit_3_inone_line(tmp_path):
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
