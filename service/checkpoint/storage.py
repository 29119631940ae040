"""The storage seam: every checkpoint byte goes through one fsspec filesystem.

Local paths, ``file://``, ``s3://`` (s3fs), ``memory://`` and any other fsspec protocol whose
package is installed (gcs, azure) work the same. Paths inside this module are fsspec paths
(``bucket/prefix/...`` on S3, absolute paths on local disk).
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

from fsspec.core import url_to_fs

from service.config import redact_url
from service.errors import UserError

log = logging.getLogger(__name__)

OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "az", "adl"})


@dataclass(frozen=True)
class StorageOptions:
    endpoint_url: str | None = None
    region: str | None = None


def _fs_kwargs(url: str, options: StorageOptions) -> dict[str, Any]:
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("s3", "s3a"):
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
            "config_kwargs": {"retries": {"max_attempts": 3, "mode": "standard"}},
        }
    if protocol in ("file", "local"):
        return {"auto_mkdir": True}
    return {}


class Storage:
    """A checkpoint root on some filesystem, with the few operations the protocol needs.

    Callers name objects relative to the root and never touch fsspec; only the DCP adapter
    (``dcp_io``, ``direct_read``) binds DCP's readers and writers to ``fs`` itself.
    """

    def __init__(self, url: str, options: StorageOptions | None = None):
        self.url = url.rstrip("/") or url
        self.options = options or StorageOptions()
        try:
            self.fs, root = url_to_fs(self.url, **_fs_kwargs(self.url, self.options))
        except (ValueError, ImportError) as e:
            raise UserError(f"storage URL {redact_url(url)!r} is not usable: {e}") from None
        self.root = root.rstrip("/") if root not in ("/", "") else root
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.protocol = protocol
        self.is_object_store = protocol in OBJECT_STORE_PROTOCOLS
        self.is_local = protocol in ("file", "local")
        self.is_s3 = protocol in ("s3", "s3a")  # conditional writes, ETags, folder entries

    def __repr__(self) -> str:
        return f"Storage({redact_url(self.url)!r})"

    @property
    def display_url(self) -> str:
        return redact_url(self.url)

    def same_root(self, other: "Storage") -> bool:
        """Whether ``other`` names the same place (``/x``, ``file:///x`` and ``/x/`` do)."""
        return (self.protocol, self.root.rstrip("/")) == (other.protocol, other.root.rstrip("/"))

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if parts else self.root

    def url_of(self, *parts: str) -> str:
        return posixpath.join(self.url, *parts)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def write_bytes_atomic(self, rel: str, data: bytes, if_version: str | None = None) -> None:
        """Replace ``rel`` with ``data`` so that readers see the old or the new, never half.

        A single PUT is atomic on object stores; on file systems write a temp file, rename.
        ``if_version`` (an ETag from ``version``): on S3 the write only happens if the object
        is still that version (``If-Match``); a changed object raises OSError.
        """
        target = self.path(rel)
        if self.is_object_store:
            if if_version and self.is_s3:
                self.fs.pipe_file(target, data, IfMatch=if_version)
            else:
                self.fs.pipe_file(target, data)
            return
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        if self.is_local:
            # Durable before it becomes visible: the manifest and the pointer are what make a
            # checkpoint committed, so they must survive a power loss as the shards do.
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)  # atomic on POSIX, unlike fs.mv on some versions
            _fsync_dir(os.path.dirname(target))
        else:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, target)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``rel`` (one PUT on object stores); see ``write_bytes_atomic`` for files that
        readers must never see half-written."""
        self.fs.pipe_file(self.path(rel), data)

    def create_exclusive(self, rel: str, data: bytes) -> None:
        """Create ``rel`` only if it does not exist yet; FileExistsError otherwise.

        The write that makes incarnation numbers unique: S3's ``If-None-Match: *`` (s3fs
        ``mode="create"``), ``O_EXCL`` on local disks. Other stores check, then write.
        """
        target = self.path(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "short write", target)
                os.fsync(fd)
            except BaseException:
                # Ours (O_EXCL) and incomplete (a full disk): an empty record would claim the
                # name for nobody, and every later start would take it for a newer owner.
                os.close(fd)
                os.unlink(target)
                raise
            os.close(fd)
            _fsync_dir(os.path.dirname(target))
        elif self.is_s3:
            try:
                self.fs.pipe_file(target, data, mode="create")
            except OSError as e:
                # s3fs maps a 412 to FileExistsError only when the answer names the condition
                # (<Condition>If-None-Match</Condition>); SeaweedFS and others omit it.
                if isinstance(e, FileExistsError) or precondition_failed(e):
                    raise FileExistsError(errno.EEXIST, "already exists", target) from None
                raise
        else:
            if self.fs.exists(target):
                raise FileExistsError(target)
            self.fs.pipe_file(target, data)

    def version(self, rel: str) -> str | None:
        """An object store's ETag for ``rel`` (None if missing, or on file systems), for a
        conditional replace with ``write_bytes_atomic(..., if_version=...)``."""
        if not self.is_s3:
            return None
        try:
            etag = self.fs.info(self.path(rel)).get("ETag")
        except FileNotFoundError:
            return None
        return str(etag) if etag else None

    def list_dir(self, rel: str = "") -> list[str]:
        """Names (not paths) of the entries directly under ``rel``; [] if it does not exist.

        On S3 a "folder" is only a shared key prefix, yet some servers (SeaweedFS) keep an empty
        directory entry after its last object is deleted: such ghosts are not listed.
        """
        where = self.path(rel) if rel else self.root
        try:
            entries = self.fs.ls(where, detail=True, refresh=True)
        except FileNotFoundError:
            return []
        except TypeError:  # filesystems without the refresh flag
            entries = self.fs.ls(where, detail=True)
        names = []
        for entry in entries:
            path = str(entry["name"]).rstrip("/")
            if self.is_s3 and entry.get("type") == "directory" and not self._has_objects(path):
                continue
            names.append(posixpath.basename(path))
        return sorted(names)

    def remove(self, rel: str) -> None:
        """Delete one object or file; FileNotFoundError if it does not exist, PermissionError
        if the store kept it (S3's bulk delete reports refusals per key, which s3fs drops)."""
        self.fs.rm_file(self.path(rel))
        if self.is_object_store and self._is_object(self.path(rel)):
            raise self._still_there(rel)

    def tree_bytes(self, rel: str) -> int:
        """Total size of everything under ``rel`` (0 if it does not exist)."""
        try:
            return int(self.fs.du(self.path(rel)))
        except (FileNotFoundError, OSError):
            return 0

    def exists(self, rel: str) -> bool:
        """Whether ``rel`` is a file or a folder with something in it (an empty directory entry
        that an S3 server kept after its objects were deleted does not count)."""
        target = self.path(rel)
        if self.is_s3:
            return self._is_object(target) or self._has_objects(target)
        return self.fs.exists(target)

    def remove_tree(self, rel: str) -> None:
        """Delete ``rel`` and everything under it; PermissionError if an object survived."""
        target = self.path(rel)
        if not self.fs.exists(target):
            return
        if not self.is_s3 or self._has_objects(target):
            self.fs.rm(target, recursive=True)
        if self.is_s3:
            self._remove_directory_entries(target)
            if self._has_objects(target):
                raise self._still_there(rel)
        elif self.is_object_store and self.fs.exists(target):
            raise self._still_there(rel)

    def _still_there(self, rel: str) -> PermissionError:
        """A delete the store accepted but did not do: S3's bulk delete reports refusals per
        key, which s3fs drops."""
        return PermissionError(f"{self.display_url}/{rel} is still there after deleting it "
                               "(the credentials may not delete)")

    # -- S3 without folders: what is an object, what has objects under it --------------------
    def _has_objects(self, path: str) -> bool:
        """Whether any object's key starts with ``path/`` (one flat listing of a few keys).
        Zero-byte ``folder/`` keys (folder markers, as the AWS console makes) do not count."""
        bucket, key, _ = self.fs.split_path(path)
        prefix = f"{key.rstrip('/')}/" if key else ""
        answer = self.fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=50)
        return any(not (o["Key"].endswith("/") and not o.get("Size")) for o in answer.get("Contents", []))

    def _is_object(self, path: str) -> bool:
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

    def makedirs(self, rel: str = "") -> None:
        if not self.is_object_store:
            self.fs.makedirs(self.path(rel) if rel else self.root, exist_ok=True)

def _fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (POSIX: the directory entry is in the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_storage(url: str, endpoint_url: str | None = None, region: str | None = None) -> Storage:
    return Storage(url, StorageOptions(endpoint_url=endpoint_url, region=region))


def check_shared(url: str, processes: int) -> None:
    """A job of several processes needs a checkpoint root they all see: ``memory://`` lives in
    one process's memory, so each rank would "commit" into a store of its own that is gone when
    it exits."""
    if processes > 1 and url.startswith("memory://"):
        raise UserError(
            f"checkpoint.url = {redact_url(url)!r} is one process's memory, but this job has {processes} "
            "processes: each would write to its own store and nothing would last; use a local path "
            "or s3://bucket/prefix")


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
