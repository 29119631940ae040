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
            if if_version and self.protocol in ("s3", "s3a"):
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
        elif self.protocol in ("s3", "s3a"):
            self.fs.pipe_file(target, data, mode="create")
        else:
            if self.fs.exists(target):
                raise FileExistsError(target)
            self.fs.pipe_file(target, data)

    def version(self, rel: str) -> str | None:
        """An object store's ETag for ``rel`` (None if missing, or on file systems), for a
        conditional replace with ``write_bytes_atomic(..., if_version=...)``."""
        if self.protocol not in ("s3", "s3a"):
            return None
        try:
            etag = self.fs.info(self.path(rel)).get("ETag")
        except FileNotFoundError:
            return None
        return str(etag) if etag else None

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def list_dir(self, rel: str = "") -> list[str]:
        """Names (not paths) of the entries directly under ``rel``; [] if it does not exist."""
        try:
            entries = self.fs.ls(self.path(rel) if rel else self.root, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        except TypeError:  # filesystems without the refresh flag
            entries = self.fs.ls(self.path(rel) if rel else self.root, detail=False)
        return sorted(posixpath.basename(str(e).rstrip("/")) for e in entries)

    def remove(self, rel: str) -> None:
        """Delete one object or file; FileNotFoundError if it does not exist, PermissionError
        if the store kept it (S3's bulk delete reports refusals per key, which s3fs drops)."""
        self.fs.rm_file(self.path(rel))
        self._gone(rel)

    def tree_bytes(self, rel: str) -> int:
        """Total size of everything under ``rel`` (0 if it does not exist)."""
        try:
            return int(self.fs.du(self.path(rel)))
        except (FileNotFoundError, OSError):
            return 0

    def remove_tree(self, rel: str) -> None:
        target = self.path(rel)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)
            self._gone(rel)

    def _gone(self, rel: str) -> None:
        if self.is_object_store and self.fs.exists(self.path(rel)):
            raise PermissionError(f"{self.display_url}/{rel} is still there after deleting it "
                                  "(the credentials may not delete)")

    def makedirs(self, rel: str = "") -> None:
        if not self.is_object_store:
            self.fs.makedirs(self.path(rel) if rel else self.root, exist_ok=True)

    def check_reachable(self, write: bool = True) -> bool:
        """Fail fast, with the URL (never a secret) and a hint, if the root cannot be used;
        return whether the root exists (on object stores: whether anything is under it).

        Endpoint down, DNS, TLS, wrong credentials: StorageError (exit code 3). With ``write``
        (workers, the launcher) a probe object is also created and deleted under the root, so
        read-only credentials fail at start-up rather than at the first save, and a missing
        bucket is a wrong URL (UserError, exit code 2). Without it (the read-only commands) a
        missing root or bucket is no error here: the caller says what "nothing there" means.
        """
        try:
            if self.is_object_store:
                # ls, not exists(): s3fs's exists() answers False for a dead endpoint, a
                # refused credential, or a bucket the credentials may list but not HEAD.
                exists = _list_or_missing(self.fs, self.root)
            elif write:
                self.makedirs()
                exists = _list_or_missing(self.fs, self.root)
            else:
                exists = self.fs.exists(self.root) and _list_or_missing(self.fs, self.root)
        except UserError:
            raise
        except Exception as e:  # connection refused, DNS, TLS ... — one line, not a trace
            raise _unusable(self, e, "read") from None
        if write:
            _probe_write(self)
        return exists


def _fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (POSIX: the directory entry is in the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


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


# -- check_reachable's helpers -----------------------------------------------------------------
PROBE_PREFIX = ".ftdiff-probe-"
# botocore error codes that mean "these credentials may not do this" (s3fs maps most of them to
# PermissionError; a raw ClientError can still surface from other code paths).
_DENIED_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                           "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem"})
_BAD_PATH_ERRNOS = frozenset({"ENOTDIR", "EEXIST", "ENAMETOOLONG", "EISDIR", "EINVAL"})
_DENIED_ERRNOS = frozenset({"EACCES", "EPERM", "EROFS"})
_LOCAL_VERBS = {"read": "create or list", "write": "write in", "delete": "delete in"}


def _list_or_missing(fs: Any, root: str) -> bool:
    """List ``root``: whether it exists. A root (or bucket) that does not exist yet is no
    error here; an empty bucket lists as [] and exists, a prefix with nothing under it not."""
    try:
        fs.ls(root, detail=False)
    except FileNotFoundError:
        return False
    return True


def _probe_write(storage: Storage) -> None:
    """Create and delete ``.ftdiff-probe-<uuid>`` under the root (a unique name per process,
    so ranks starting together never collide); errors become UserError/StorageError."""
    probe = storage.path(f"{PROBE_PREFIX}{uuid.uuid4().hex}")
    try:
        storage.fs.pipe_file(probe, b"")
    except FileNotFoundError:
        bucket = storage.root.split("/", 1)[0]
        what = f"bucket {bucket!r} does not exist" if storage.is_object_store else "its folder cannot be created"
        raise UserError(f"storage URL {storage.display_url!r}: {what} (create it, or fix checkpoint.url)") from None
    except Exception as e:
        raise _unusable(storage, e, "write") from None
    try:
        storage.fs.rm_file(probe)
        if storage.fs.exists(probe):  # a bulk delete that the store refused per key
            raise PermissionError("the probe object is still there after deleting it")
    except Exception as e:
        raise _unusable(storage, e, "delete", left=probe) from None


def _error_code(e: BaseException) -> str | None:
    """The botocore error code of ``e`` or of its cause (s3fs chains the ClientError)."""
    for err in (e, e.__cause__, e.__context__):
        response = getattr(err, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code"):
            return str(response["Error"]["Code"])
    return None


def _unusable(storage: Storage, e: BaseException, stage: str, left: str | None = None) -> UserError:
    """The one-line error for a failed check: denied and unreachable are StorageError (the
    URL is right, the access is not), a path that cannot be a folder is a UserError."""
    import errno

    from service.config import redact_text
    from service.errors import StorageError

    url = storage.display_url
    detail = f"{type(e).__name__}: {redact_text(_first_line(e))}"
    local_errno = errno.errorcode.get(e.errno or 0) if storage.is_local and isinstance(e, OSError) else None
    denied = isinstance(e, PermissionError) or _error_code(e) in _DENIED_CODES or local_errno in _DENIED_ERRNOS
    if denied and storage.is_local:
        # A folder, not credentials: typically an image's non-root user under a root-owned
        # working directory, or a read-only mount.
        return StorageError(
            f"storage URL {url!r}: cannot {_LOCAL_VERBS.get(stage, stage)} the folder as uid {os.getuid()} "
            f"({detail}); make the folder "
            "writable for this user (chown, or mount a writable volume) or set checkpoint.url to a "
            "writable place")
    if denied:
        if stage == "read":
            hint = ("check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the AWS profile)"
                    if storage.is_object_store else "check the folder's permissions")
            return StorageError(f"storage URL {url!r}: access denied ({detail}); {hint}")
        extra = f"; the probe {posixpath.basename(left)!r} was left behind" if left else ""
        return StorageError(
            f"storage URL {url!r}: {stage} access denied ({detail}): these credentials can read the "
            f"checkpoint root but not {stage} in it, and training must do both{extra}")
    if local_errno in _BAD_PATH_ERRNOS:
        return UserError(f"storage URL {url!r} cannot be used as a folder: {detail}")
    if isinstance(e, FileNotFoundError):
        return UserError(f"storage URL {url!r} does not exist ({detail})")
    where = "checkpoint.endpoint_url / --endpoint-url / AWS_ENDPOINT_URL" if storage.is_object_store else "the mount"
    return StorageError(f"storage URL {url!r} is unreachable: {detail} (check {where})")
