"""Each storage backend answers for its store; the generic one serves any other fsspec protocol.
The S3 backend is exercised for real in tests/integration/test_real_s3.py (SeaweedFS)."""

from __future__ import annotations

import uuid

import pytest

from service.checkpoint.backends import Backend, LocalBackend, S3Backend, backend_class
from service.checkpoint.backends.base import CHECK_THEN_WRITE, EXCLUSIVE_CREATE, HTTP_PRECONDITIONS
from service.checkpoint.storage import open_storage

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("protocol, cls, object_store, threads, creates", [
    ("file", LocalBackend, False, 1, EXCLUSIVE_CREATE),
    ("s3", S3Backend, True, 4, HTTP_PRECONDITIONS),
    ("memory", Backend, False, 1, CHECK_THEN_WRITE),
    ("gs", Backend, True, 4, CHECK_THEN_WRITE),
])
def test_each_protocol_gets_its_backend_and_its_answers(protocol, cls, object_store, threads, creates):
    assert backend_class(protocol) is cls
    backend = cls(fs=None, protocol=protocol)
    assert (backend.object_store, backend.default_writer_threads, backend.conditional_writes) == (
        object_store, threads, creates)
    assert backend.on_local_disk == (protocol == "file")


@pytest.fixture(params=["local", "memory"])
def storage(request, tmp_path):
    url = str(tmp_path / "root") if request.param == "local" else f"memory://backends-{uuid.uuid4().hex}"
    s = open_storage(url)
    s.makedirs()
    return s


def test_the_storage_contract_holds_on_every_file_backend(storage):
    storage.makedirs("a")  # an atomic replace never creates folders (a root deleted mid-run stays gone)
    storage.write_bytes_atomic("a/latest", b"1")
    storage.write_bytes_atomic("a/latest", b"2")
    assert storage.read_bytes("a/latest") == b"2"
    storage.create_exclusive("a/claim", b"mine")
    with pytest.raises(FileExistsError):
        storage.create_exclusive("a/claim", b"theirs")
    assert storage.read_bytes("a/claim") == b"mine"
    assert storage.list_dir("a") == ["claim", "latest"] and storage.exists("a")
    storage.remove("a/claim")
    assert not storage.exists("a/claim")
    storage.remove_tree("a")
    assert not storage.exists("a") and storage.list_dir("a") == []
    assert storage.version("a/latest") is None  # no versions offered: unconditional replaces


def test_a_failed_local_exclusive_create_leaves_no_claim(tmp_path, monkeypatch):
    import os

    storage = open_storage(str(tmp_path))
    monkeypatch.setattr(os, "write", lambda fd, data: 0)  # a full disk: a short write
    with pytest.raises(OSError):
        storage.create_exclusive("claim", b"mine")
    monkeypatch.undo()
    assert not storage.exists("claim")


@pytest.mark.parametrize("root, why", [
    ("Bad_Bucket/x", "is not a valid S3 bucket name"),
    ("192.168.1.1/x", "is not a valid S3 bucket name"),
    ("ok-bucket/a/../b", "'.' and '..' are not folders"),
])
def test_s3_refuses_roots_no_store_accepts(root, why):
    assert why in (S3Backend(fs=None, protocol="s3").check_root(root) or "")


def test_s3_accepts_ordinary_roots():
    assert S3Backend(fs=None, protocol="s3").check_root("my.bucket-1/runs/x") is None
