"""S3 and S3-compatible stores (AWS, SeaweedFS, MinIO, Ceph) through s3fs.

Conditional writes are HTTP preconditions (If-None-Match: *, If-Match: <ETag>), which some
S3-compatible gateways ignore: storage_check proves them at start-up. A "folder" is a key
prefix, yet filer-backed servers (SeaweedFS) keep a directory entry after its last object is
deleted, and a console makes zero-byte ``folder/`` markers: neither counts as something there.
S3's bulk delete reports refusals per key, which s3fs drops: deletes are checked.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from service.checkpoint.backends.base import HTTP_PRECONDITIONS, Backend
from service.checkpoint.backends.s3_upload import MultipartStream, RoundTrip

_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IP_LIKE = re.compile(r"\d+\.\d+\.\d+\.\d+")
_RESERVED = (("xn--", "sthree-", "amzn-s3-demo-"), ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3"))


class S3Backend(Backend):
    protocols: ClassVar[tuple[str, ...]] = ("s3", "s3a")
    conditional_writes: ClassVar[str] = HTTP_PRECONDITIONS

    def __init__(self, fs: Any, protocol: str):
        super().__init__(fs, protocol)
        self.round_trip = RoundTrip()  # measured on the first write: parts or one PUT (s3_upload)

    @property
    def object_store(self) -> bool:
        return True

    @property
    def where_to_fix_access(self) -> str:
        return "checkpoint.endpoint_url / --endpoint-url / AWS_ENDPOINT_URL"

    @staticmethod
    def fs_kwargs(options: Any) -> dict[str, Any]:
        client: dict[str, Any] = {}
        endpoint = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            client["endpoint_url"] = endpoint
        region = options.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            client["region_name"] = region
        # Credentials come from the standard AWS chain (env, ~/.aws, instance role).
        # Listing caches off: discovery must see checkpoints other ranks/jobs just wrote.
        return {
            "client_kwargs": client,
            "use_listings_cache": False,
            "skip_instance_cache": True,
            # Bodies are not SHA-256 signed (headers are), as every S3 SDK sends them over
            # https: each upload carries a checksum the store verifies instead (botocore's
            # CRC-32, or ours per part, see s3_upload). Over plain http, signing would cost a
            # SHA-256 pass over every checkpoint byte on s3fs's one event-loop thread.
            "config_kwargs": {"retries": {"max_attempts": 3, "mode": "standard"},
                              "s3": {"payload_signing_enabled": False}},
        }

    def check_root(self, root: str) -> str | None:
        bucket, _, key = root.partition("/")
        if (not _BUCKET_NAME.fullmatch(bucket) or ".." in bucket or _IP_LIKE.fullmatch(bucket)
                or bucket.startswith(_RESERVED[0]) or bucket.endswith(_RESERVED[1])):
            return (f"{bucket!r} is not a valid S3 bucket name (3-63 characters: lower-case letters, digits, "
                    "dots and hyphens, starting and ending with a letter or digit, not an IP address)")
        if any(part in (".", "..") for part in key.split("/")):
            return "'.' and '..' are not folders on S3 (keys are plain names)"
        return None

    def write_atomic(self, path: str, data: bytes, if_version: str | None = None) -> None:
        if if_version:  # only if the object is still that version; a changed one raises OSError
            self.fs.pipe_file(path, data, IfMatch=if_version)
        else:
            self.fs.pipe_file(path, data)

    @contextmanager
    def open_for_write(self, path: str) -> Iterator[Any]:
        """Parts uploaded while the stream is written; nothing under ``path`` after an error."""
        bucket, key, _ = self.fs.split_path(path)
        self.round_trip.start(self.fs, bucket)  # once per backend: how far the store is
        stream = MultipartStream(self.fs, bucket, key, self.round_trip)
        try:
            yield stream
        except BaseException:
            stream.abort()
            raise
        finally:
            stream.close()

    def create_exclusive(self, path: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(path, data, mode="create")  # If-None-Match: *
        except OSError as e:
            # s3fs maps a 412 to FileExistsError only when the answer names the condition
            # (<Condition>If-None-Match</Condition>); SeaweedFS and others omit it.
            if isinstance(e, FileExistsError) or precondition_failed(e):
                raise FileExistsError(errno.EEXIST, "already exists", path) from None
            raise

    def version(self, path: str) -> str | None:
        try:
            etag = self.fs.info(path).get("ETag")
        except FileNotFoundError:
            return None
        return str(etag) if etag else None

    def listed(self, entry: dict[str, Any]) -> bool:
        return entry.get("type") != "directory" or self.has_objects(str(entry["name"]).rstrip("/"))

    def exists(self, path: str) -> bool:
        return self.is_object(path) or self.has_objects(path)

    def kept_after_delete(self, path: str) -> bool:
        return self.is_object(path)

    def remove_tree(self, path: str) -> bool:
        if self.has_objects(path):
            self.fs.rm(path, recursive=True)
        self._remove_directory_entries(path)
        return self.has_objects(path)

    def has_objects(self, path: str) -> bool:
        """Whether any object's key starts with ``path/`` (one flat listing of a few keys).
        Zero-byte ``folder/`` keys (folder markers, as the AWS console makes) do not count."""
        bucket, key, _ = self.fs.split_path(path)
        prefix = f"{key.rstrip('/')}/" if key else ""
        answer = self.fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=50)
        return any(not (o["Key"].endswith("/") and not o.get("Size")) for o in answer.get("Contents", []))

    def is_object(self, path: str) -> bool:
        try:
            return self.fs.info(path).get("type") == "file"
        except FileNotFoundError:
            return False

    def _remove_directory_entries(self, path: str) -> None:
        """Delete the directory entries (``key/``) under and of ``path``, deepest first: S3
        servers that keep folders (SeaweedFS) list a folder until its entry is deleted, and
        delete an entry only once it has no sub-entries. On AWS these keys do not exist and
        each delete is a no-op."""
        bucket, key, _ = self.fs.split_path(path)
        pending, found = [key.rstrip("/") + "/"], []
        while pending and len(found) < 100_000:
            prefix = pending.pop()
            found.append(prefix)
            answer = self.fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, Delimiter="/")
            pending += [p["Prefix"] for p in answer.get("CommonPrefixes", [])]
        for prefix in sorted(found, key=lambda k: -k.count("/")):
            self.fs.call_s3("delete_object", Bucket=bucket, Key=prefix)


def precondition_failed(e: BaseException) -> bool:
    """An S3 412: a conditional write (If-None-Match / If-Match) whose condition did not hold."""
    return error_code(e) in ("PreconditionFailed", "412")


def error_code(e: BaseException) -> str | None:
    """The botocore error code of ``e`` or of its cause (s3fs chains the ClientError)."""
    for err in (e, e.__cause__, e.__context__):
        response = getattr(err, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code"):
            return str(response["Error"]["Code"])
    return None
