"""What a real S3 server does that an emulator does not, on SeaweedFS: folders that outlive
their objects, a 412 without a <Condition>, ghosts in listings."""

from __future__ import annotations

import json

import boto3
import pytest

from service.checkpoint.catalog import Catalog
from service.checkpoint.manifest import step_dir
from service.checkpoint.storage import open_storage
from tests.helpers import CheckpointJob as Job
from tests.helpers import ftdiff_inprocess as ftdiff


def _client(s3_server: dict[str, str]):  # type: ignore[no-untyped-def]
    return boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id=s3_server["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=s3_server["AWS_SECRET_ACCESS_KEY"])


def _folders(s3_server: dict[str, str], url: str) -> list[str]:
    """The prefixes the server itself lists under ``url`` (a delimiter listing, as `ls` does)."""
    bucket, _, key = url[len("s3://"):].partition("/")
    answer = _client(s3_server).list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", Delimiter="/")
    return sorted(p["Prefix"].rstrip("/").rsplit("/", 1)[-1] for p in answer.get("CommonPrefixes", []))


def _train(job: Job, steps: int) -> None:
    for _ in range(steps):
        job.step()
        assert job.ckpt.save_at(job.train.step, 0, blocking=True)


@pytest.mark.timeout(120)
def test_retention_leaves_no_empty_step_folders(s3_server, s3_bucket):
    url = f"{s3_bucket}/run"
    job = Job(url, "checkpoint.keep_last=2", "checkpoint.async=false")
    job.ckpt.resume()
    _train(job, 5)
    job.ckpt.drain()
    steps = [f for f in _folders(s3_server, url) if f.startswith("step-")]
    assert steps == [step_dir(4), step_dir(5)]  # the deleted ones are gone from the server's listing too
    assert [(i.step, i.committed) for i in Catalog(open_storage(url)).describe()] == [(4, True), (5, True)]


@pytest.mark.timeout(120)
def test_a_failed_saves_debris_is_removed_and_the_step_commits(s3_server, s3_bucket):
    """A crash mid-save leaves shard objects of step 2 without a manifest: the next save of
    step 2 clears them (files and the folder the server keeps) and commits."""
    url = f"{s3_bucket}/run"
    client = _client(s3_server)
    bucket = s3_bucket[len("s3://"):]
    for name in ("__0_0.distcp", "nested/part"):
        client.put_object(Bucket=bucket, Key=f"run/{step_dir(2)}/{name}", Body=b"debris")
    job = Job(url, "checkpoint.async=false")
    job.ckpt.resume()
    _train(job, 2)
    job.ckpt.drain()
    catalog = Catalog(open_storage(url))
    assert catalog.committed_steps() == [1, 2] and catalog.verify(2) == []
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"run/{step_dir(2)}/")["Contents"]]
    assert not [k for k in keys if "debris" in k or k.endswith("nested/part")]


@pytest.mark.timeout(60)
def test_a_folder_emptied_elsewhere_is_not_listed_as_a_partial_checkpoint(s3_server, s3_bucket):
    client = _client(s3_server)
    bucket = s3_bucket[len("s3://"):]
    key = f"run/{step_dir(9)}/__0_0.distcp"
    client.put_object(Bucket=bucket, Key=key, Body=b"x")
    client.delete_object(Bucket=bucket, Key=key)
    assert _folders(s3_server, f"{s3_bucket}/run") == [step_dir(9)]  # the server keeps the folder
    res = ftdiff("ckpt", "ls", f"{s3_bucket}/run", "--json")
    assert res.returncode != 0 or json.loads(res.stdout) == []
    assert "partial" not in res.stdout
    storage = open_storage(f"{s3_bucket}/run")
    assert not storage.exists(step_dir(9)) and storage.list_dir() == []


@pytest.mark.timeout(60)
def test_a_lost_create_race_is_file_exists_though_the_412_names_no_condition(s3_server, s3_bucket):
    storage = open_storage(f"{s3_bucket}/run")
    storage.create_exclusive("incarnations/000000001.json", b"{}")
    with pytest.raises(FileExistsError):
        storage.create_exclusive("incarnations/000000001.json", b"{}")


@pytest.mark.timeout(60)
def test_a_console_folder_marker_is_not_a_partial_checkpoint(s3_server, s3_bucket):
    """The AWS console makes a folder as a zero-byte ``folder/`` key."""
    _client(s3_server).put_object(Bucket=s3_bucket[len("s3://"):], Key=f"run/{step_dir(99)}/", Body=b"")
    storage = open_storage(f"{s3_bucket}/run")
    assert storage.list_dir() == [] and not storage.exists(step_dir(99))


@pytest.mark.timeout(60)
def test_a_stray_incarnation_name_breaks_nothing(s3_server, s3_bucket):
    """'²'.isdigit() is True but int('²') raises: such a key made every save fail."""
    _client(s3_server).put_object(Bucket=s3_bucket[len("s3://"):], Key="run/incarnations/\u00b2.json", Body=b"{}")
    job = Job(f"{s3_bucket}/run", "checkpoint.async=false")
    job.ckpt.resume()
    _train(job, 2)
    assert Catalog(open_storage(f"{s3_bucket}/run")).committed_steps() == [1, 2]


def test_runs_ls_reads_a_runs_bucket_checkpoints_through_the_endpoint_it_is_given(s3_server, s3_bucket, tmp_path,
                                                                                  monkeypatch):
    from tests.helpers import committed_root

    url = committed_root(f"{s3_bucket}/exp/checkpoints", 2)
    (tmp_path / "runs" / "exp").mkdir(parents=True)
    (tmp_path / "runs" / "exp" / "status.json").write_text(json.dumps(
        {"name": "exp", "state": "finished", "checkpoint_url": url, "max_steps": 2}))
    endpoint = s3_server["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the option says where the store is
    res = ftdiff("runs", "ls", str(tmp_path / "runs"), "--json", "--endpoint-url", endpoint)
    assert res.returncode == 0, res.stderr
    assert [(r["name"], r["step"]) for r in json.loads(res.stdout)] == [("exp", 2)]
