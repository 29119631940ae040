"""Fencing rests on conditional writes, so start-up proves the store honours them, and a
wrong bucket is a wrong URL found before anything is written.

The store that ignores them is moto behind tests/http_proxy.py dropping ``If-None-Match`` and
``If-Match``: moto answers unsigned-checked requests, and a proxy can only drop headers that
the signature does not cover — SeaweedFS checks SigV4, which signs those headers.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator

import boto3
import pytest

from service.checkpoint.catalog import Catalog
from service.checkpoint.storage import open_storage
from service.checkpoint.storage_check import check_reachable
from service.errors import EXIT_USAGE, StorageError, UserError
from tests.helpers import base_env, moto_server, one_line, single_cmd
from tests.helpers import ftdiff_inprocess as ftdiff
from tests.http_proxy import ProxyControl, s3_http_proxy

CONDITIONAL = frozenset({"if-none-match", "if-match"})
MOTO_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def unfenced_store(moto_endpoint, monkeypatch) -> Iterator[str]:
    """A bucket on a store that ignores conditional writes; its root URL. The environment
    points clients (this process and children) at the proxy."""
    bucket = f"unfenced-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    with s3_http_proxy(moto_endpoint, ProxyControl(drop_headers=CONDITIONAL)) as (url, _):
        for k, v in {**MOTO_KEYS, "AWS_ENDPOINT_URL": url}.items():
            monkeypatch.setenv(k, v)
        yield f"s3://{bucket}/run"


@pytest.mark.timeout(60)
def test_a_store_honouring_conditional_writes_passes(moto_endpoint, monkeypatch):
    bucket = f"fenced-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    for k, v in {**MOTO_KEYS, "AWS_ENDPOINT_URL": moto_endpoint}.items():
        monkeypatch.setenv(k, v)
    check_reachable(open_storage(f"s3://{bucket}/run"))


@pytest.mark.timeout(60)
def test_a_store_ignoring_conditional_writes_is_refused_unless_single_writer_is_accepted(unfenced_store):
    storage = open_storage(unfenced_store)
    with pytest.raises(UserError) as refused:
        check_reachable(storage)
    message = str(refused.value)
    assert not isinstance(refused.value, StorageError)  # exit 2: the store is wrong for the job
    assert "ignores conditional writes" in message and "If-None-Match" in message and "If-Match" in message
    assert "checkpoint.single_writer = true" in message
    check_reachable(storage, single_writer=True)  # accepted explicitly: runs, unfenced
    assert storage.list_dir() == []  # the probes are gone either way
    res = ftdiff("train", "--dry-run", "--set", f'checkpoint.url="{unfenced_store}"', "--set", "supervisor.port=0",
                 "--set", "metrics.port=0")
    assert res.returncode == EXIT_USAGE and "ignores conditional writes" in one_line(res.stderr)


@pytest.mark.timeout(180)
def test_two_starts_at_once_on_such_a_store_both_refuse_instead_of_sharing_an_incarnation(unfenced_store):
    """Before: both claimed the same incarnation (create-if-absent silently overwrote) and both
    trained and exited 0."""
    cmd = single_cmd(["train.max_steps=4", "checkpoint.every_steps=2", f'checkpoint.url="{unfenced_store}"'])
    procs = [subprocess.Popen(cmd, env=base_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=150), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    for code, err in results:
        assert code == EXIT_USAGE, err[-2000:]
        assert "ignores conditional writes" in err
    assert Catalog(open_storage(unfenced_store)).committed_steps() == []


@pytest.mark.timeout(60)
def test_a_missing_bucket_is_found_before_anything_is_written(s3, monkeypatch):
    """A PUT into a missing bucket creates it on stores that auto-create buckets: the check
    must list first and never PUT there."""
    with s3_http_proxy(s3.url) as (url, control):
        for k, v in {**s3.env(), "AWS_ENDPOINT_URL": url}.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(UserError, match="bucket 'no-such-bucket-21' does not exist"):
            check_reachable(open_storage("s3://no-such-bucket-21/run"))
        assert control.seen and not [m for m, _ in control.seen if m in ("PUT", "POST")]
        res = ftdiff("train", "--dry-run", "--set", 'checkpoint.url="s3://no-such-bucket-21/run"',
                     "--set", "supervisor.port=0", "--set", "metrics.port=0")
        assert res.returncode == EXIT_USAGE and "does not exist" in one_line(res.stderr)
        assert not [m for m, _ in control.seen if m in ("PUT", "POST")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bucket", ["Upper_Case", "ab", "-leading-hyphen", "a..b", "x" * 64, "192.168.1.1",
                                    "xn--abc", "abc-s3alias"])
def test_an_invalid_bucket_name_is_a_wrong_url_exit_2(s3_server, bucket):
    with pytest.raises(UserError, match="not a valid S3 bucket name") as refused:
        check_reachable(open_storage(f"s3://{bucket}/run"))
    assert not isinstance(refused.value, StorageError)
    res = ftdiff("train", "--dry-run", "--set", f'checkpoint.url="s3://{bucket}/run"', "--set", "supervisor.port=0",
                 "--set", "metrics.port=0")
    assert res.returncode == EXIT_USAGE and "not a valid S3 bucket name" in one_line(res.stderr)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("url", ["s3://a-bucket/run/../x", "s3://a-bucket/./run"])
def test_dot_segments_in_an_s3_url_are_a_wrong_url_exit_2(s3_server, url):
    with pytest.raises(UserError, match="not folders on S3") as refused:
        check_reachable(open_storage(url))
    assert not isinstance(refused.value, StorageError)
