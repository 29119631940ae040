"""The S3 write stream (service/checkpoint/backends/s3_upload.py) on a real S3 server: what a
checkpoint's shard files go through. Outcomes asserted: the bytes read back, what is (not)
under the key, and no upload left behind after an error."""

from __future__ import annotations

import os
import threading

import boto3
import pytest

from service.checkpoint.backends import s3_upload
from service.checkpoint.storage import open_storage

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> int:
    # 5 MiB is S3's smallest part (the last one excepted); the streams below span several.
    monkeypatch.setattr(s3_upload, "PART_SIZE", 5 * 2**20)
    monkeypatch.setattr(s3_upload, "SINGLE_PUT_LIMIT", 0)  # every file of a part or more: multipart
    return 5 * 2**20


def _client(env: dict[str, str]):  # type: ignore[no-untyped-def]
    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")


def _pending_uploads(env: dict[str, str], bucket: str) -> list[str]:
    return [u["Key"] for u in _client(env).list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def test_a_file_of_many_parts_reads_back_byte_for_byte(s3_server, s3_bucket, small_parts):
    storage = open_storage(f"{s3_bucket}/root")
    data = os.urandom(3 * small_parts + 12345)  # three full parts and a short last one
    with storage.backend.open_for_write(storage.path("big.bin")) as stream:
        for start in range(0, len(data), 1_000_003):  # writes that straddle part boundaries
            stream.write(data[start:start + 1_000_003])
        assert stream.tell() == len(data)
    assert storage.read_bytes("big.bin") == data
    assert _pending_uploads(s3_server, s3_bucket.removeprefix("s3://")) == []


def test_a_file_smaller_than_a_part_is_one_put(s3_server, s3_bucket):
    storage = open_storage(f"{s3_bucket}/root")
    with storage.backend.open_for_write(storage.path("small.bin")) as stream:
        stream.write(b"x" * 1000)
        assert stream.upload_id is None  # no multipart upload was started
    assert storage.read_bytes("small.bin") == b"x" * 1000


def _medium_and_big_files(storage, part: int) -> tuple[str | None, str | None]:  # type: ignore[no-untyped-def]
    """Write a file of two parts and a bit, and one of three parts and a bit: the upload ids they
    got (None: one PUT) after checking that both read back."""
    ids = []
    for name, size in (("medium.bin", 2 * part + 777), ("big.bin", 3 * part + 1)):
        data = os.urandom(size)
        with storage.backend.open_for_write(storage.path(name)) as stream:
            for start in range(0, len(data), 999_999):
                stream.write(data[start:start + 999_999])
            ids.append(stream.upload_id)
        assert storage.read_bytes(name) == data
    return ids[0], ids[1]


def test_a_distant_store_gets_files_up_to_the_single_put_limit_as_one_put(s3_server, s3_bucket, monkeypatch):
    """Two more round trips (create, complete) cost a distant store more than one big PUT."""
    from tests.tcp_proxy import TcpProxy

    monkeypatch.setattr(s3_upload, "PART_SIZE", 5 * 2**20)
    monkeypatch.setattr(s3_upload, "SINGLE_PUT_LIMIT", 12 * 2**20)
    upstream = int(s3_server["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    with TcpProxy(upstream, every_request=True) as proxy:
        proxy.delay_s = 0.3  # every request: 0.3 s more, as a store in another region
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
        storage = open_storage(f"{s3_bucket}/root")
        storage.backend.round_trip.start(storage.fs, s3_bucket.removeprefix("s3://"))
        assert storage.backend.round_trip.wait(30) >= 0.3
        medium, big = _medium_and_big_files(storage, 5 * 2**20)
    assert medium is None  # under the limit: one PUT of all its parts
    assert big is not None  # over it: parts, the kept-back ones first
    assert _pending_uploads(s3_server, s3_bucket.removeprefix("s3://")) == []


def test_a_nearby_store_gets_every_file_of_a_part_or_more_in_parts(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setattr(s3_upload, "PART_SIZE", 5 * 2**20)
    monkeypatch.setattr(s3_upload, "SINGLE_PUT_LIMIT", 12 * 2**20)
    storage = open_storage(f"{s3_bucket}/root")
    storage.backend.round_trip.start(storage.fs, s3_bucket.removeprefix("s3://"))
    assert storage.backend.round_trip.wait(30) < 0.05  # the server on this machine
    medium, big = _medium_and_big_files(storage, 5 * 2**20)
    assert medium is not None and big is not None
    assert _pending_uploads(s3_server, s3_bucket.removeprefix("s3://")) == []


def test_until_the_round_trip_is_known_files_up_to_the_single_put_limit_are_one_put(s3_server, s3_bucket,
                                                                                    monkeypatch):
    monkeypatch.setattr(s3_upload, "PART_SIZE", 5 * 2**20)
    monkeypatch.setattr(s3_upload, "SINGLE_PUT_LIMIT", 12 * 2**20)
    monkeypatch.setattr(s3_upload.RoundTrip, "start", lambda *a: None)  # never measured
    storage = open_storage(f"{s3_bucket}/root")
    medium, big = _medium_and_big_files(storage, 5 * 2**20)
    assert medium is None and big is not None


def test_an_empty_file_is_written(s3_server, s3_bucket):
    storage = open_storage(f"{s3_bucket}/root")
    with storage.backend.open_for_write(storage.path("empty.bin")):
        pass
    assert storage.read_bytes("empty.bin") == b""


def test_an_error_while_writing_leaves_nothing_under_the_key_and_no_upload(s3_server, s3_bucket, small_parts):
    storage = open_storage(f"{s3_bucket}/root")
    with pytest.raises(RuntimeError, match="serialisation failed"):
        with storage.backend.open_for_write(storage.path("half.bin")) as stream:
            stream.write(os.urandom(2 * small_parts + 1))  # two parts already sent
            raise RuntimeError("serialisation failed")
    assert not storage.exists("half.bin")
    assert _pending_uploads(s3_server, s3_bucket.removeprefix("s3://")) == []


def test_a_stream_dropped_without_close_publishes_nothing(s3_server, s3_bucket, small_parts):
    storage = open_storage(f"{s3_bucket}/root")
    stream = s3_upload.MultipartStream(storage.fs, *storage.fs.split_path(storage.path("dropped.bin"))[:2])
    stream.write(os.urandom(small_parts + 10))
    del stream
    assert not storage.exists("dropped.bin")
    assert _pending_uploads(s3_server, s3_bucket.removeprefix("s3://")) == []


def test_a_store_that_refuses_the_upload_raises_and_publishes_nothing(s3, s3_server, s3_bucket, small_parts,
                                                                      monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.env(read_only=True)["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.env(read_only=True)["AWS_SECRET_ACCESS_KEY"])
    storage = open_storage(f"{s3_bucket}/root")
    with pytest.raises(PermissionError):
        with storage.backend.open_for_write(storage.path("denied.bin")) as stream:
            stream.write(os.urandom(2 * small_parts))
    monkeypatch.undo()
    assert not open_storage(f"{s3_bucket}/root").exists("denied.bin")


def test_a_part_the_store_refuses_fails_the_write_and_is_aborted(s3_server, s3_bucket, small_parts, monkeypatch):
    """A part that fails after the upload began (a corrupted body: the store checks each part's
    CRC-32C) fails the stream, and the upload is aborted."""
    storage = open_storage(f"{s3_bucket}/root")
    monkeypatch.setattr(s3_upload, "part_checksum", lambda body: "AAAAAA==")  # a wrong CRC-32C
    with pytest.raises(OSError):
        with storage.backend.open_for_write(storage.path("bad.bin")) as stream:
            stream.write(os.urandom(small_parts * (s3_upload.PARTS_IN_FLIGHT + 2)))
    assert not storage.exists("bad.bin")
    assert _pending_uploads(s3_server, s3_bucket.removeprefix("s3://")) == []


def test_streams_in_parallel_threads_share_the_loop(s3_server, s3_bucket, small_parts):
    """As DCP's writer threads do: several files at once through one filesystem's loop."""
    storage = open_storage(f"{s3_bucket}/root")
    blobs = {f"f{i}.bin": os.urandom(small_parts + i * 777_777) for i in range(4)}

    def write(name: str) -> None:
        with storage.backend.open_for_write(storage.path(name)) as stream:
            stream.write(blobs[name])

    threads = [threading.Thread(target=write, args=(name,)) for name in blobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert {name: storage.read_bytes(name) for name in blobs} == blobs


def test_part_sizes_grow_so_that_any_file_fits_the_part_limit():
    sizes = [s3_upload.part_size(n) for n in (1, 2000, 2001, 4001, 10_000)]
    assert sizes == [8 * 2**20, 8 * 2**20, 16 * 2**20, 32 * 2**20, 128 * 2**20]
    total = sum(s3_upload.part_size(n) for n in range(1, s3_upload.MAX_PARTS + 1))
    assert total > 400 * 2**30  # more than any one shard file of a rank
