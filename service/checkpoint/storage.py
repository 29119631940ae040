"""The storage seam: every checkpoint byte goes through one fsspec filesystem.

Local paths, ``file://``, ``s3://`` (s3fs), ``memory://`` and any other fsspec protocol whose
package is installed (gcs, azure) work the same. Paths inside this module are fsspec paths
(``bucket/prefix/...`` on S3, absolute paths on local disk).
"""

from __future__ import annotations

import logging
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

from fsspec.core import url_to_fs

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


def _redact(url: str) -> str:
    """Drop user:password@ from a URL before it reaches a message or a log."""
    if "://" in url and "@" in url.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


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
            raise UserError(f"storage URL {_redact(url)!r} is not usable: {e}") from None
        self.root = root.rstrip("/") if root not in ("/", "") else root
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.protocol = protocol
        self.is_object_store = protocol in OBJECT_STORE_PROTOCOLS
        self.is_local = protocol in ("file", "local")

    def __repr__(self) -> str:
        return f"Storage({_redact(self.url)!r})"

    @property
    def display_url(self) -> str:
        return _redact(self.url)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if parts else self.root

    def url_of(self, *parts: str) -> str:
        return posixpath.join(self.url, *parts)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Replace ``rel`` with ``data`` so that readers see the old or the new, never half.

        A single PUT is atomic on object stores; on file systems write a temp file, rename.
        """
        target = self.path(rel)
        if self.is_object_store:
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
        """Delete one object or file; FileNotFoundError if it does not exist."""
        self.fs.rm(self.path(rel))

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

    def makedirs(self, rel: str = "") -> None:
        if not self.is_object_store:
            self.fs.makedirs(self.path(rel) if rel else self.root, exist_ok=True)

    def check_reachable(self) -> None:
        """Fail fast, with the URL (never a secret) and a hint, if the root cannot be used."""
        try:
            if self.is_object_store:
                # ls, not exists(): s3fs's exists() answers False for a dead endpoint or a
                # refused credential too, which would be reported as a missing bucket.
                bucket = self.root.split("/", 1)[0]
                try:
                    self.fs.ls(bucket, detail=False)
                except FileNotFoundError:
                    raise UserError(
                        f"storage URL {self.display_url!r}: bucket {bucket!r} does not exist "
                        "(create it, or fix checkpoint.url)"
                    ) from None
            else:
                self.makedirs()
                self.fs.ls(self.root, detail=False)
        except UserError:
            raise
        except PermissionError as e:
            raise UserError(
                f"storage URL {self.display_url!r}: access denied ({type(e).__name__}); check the "
                "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the AWS profile)"
            ) from None
        except FileNotFoundError:
            raise UserError(f"storage URL {self.display_url!r} does not exist") from None
        except Exception as e:  # connection refused, DNS, TLS ... — the message, not a trace
            raise UserError(
                f"storage URL {self.display_url!r} is unreachable: {type(e).__name__}: "
                f"{_first_line(e)} (check checkpoint.endpoint_url / AWS_ENDPOINT_URL)"
            ) from None


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
