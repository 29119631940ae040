"""The storage seam: every checkpoint byte goes through one fsspec filesystem.

Local paths, ``file://``, ``s3://`` (s3fs), ``memory://`` and any other fsspec protocol whose
package is installed (gcs, azure) work the same: ``Storage`` names objects relative to a root,
and its ``backend`` (service/checkpoint/backends/) does what differs between stores. Paths
inside this module are fsspec paths (``bucket/prefix/...`` on S3, absolute paths on disk).
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass

from fsspec.core import url_to_fs

from service.checkpoint.backends import backend_class
from service.checkpoint.backends.s3 import error_code, precondition_failed  # noqa: F401  (callers import them from here)
from service.config import redact_url
from service.errors import UserError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class StorageOptions:
    endpoint_url: str | None = None
    region: str | None = None


class Storage:
    """A checkpoint root on some filesystem, with the few operations the protocol needs.

    Callers name objects relative to the root and never touch fsspec; only the DCP adapter
    (``dcp_io``, ``direct_read``) binds DCP's readers and writers to ``fs`` itself.
    """

    def __init__(self, url: str, options: StorageOptions | None = None):
        self.url = url.rstrip("/") or url
        self.options = options or StorageOptions()
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        try:
            self.fs, root = url_to_fs(self.url, **backend_class(protocol).fs_kwargs(self.options))
        except (ValueError, ImportError) as e:
            raise UserError(f"storage URL {redact_url(url)!r} is not usable: {e}") from None
        self.root = root.rstrip("/") if root not in ("/", "") else root
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.backend = backend_class(self.protocol)(self.fs, self.protocol)

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
        """Replace ``rel`` with ``data`` so that readers see the old or the new, never half
        (a single PUT on object stores; a durable temp file and a rename on file systems).
        ``if_version`` (from ``version``): where the store offers versions (S3's ETag), the
        write only happens if the object is still that version; a changed one raises OSError.
        """
        self.backend.write_atomic(self.path(rel), data, if_version)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``rel`` (one PUT on object stores); see ``write_bytes_atomic`` for files that
        readers must never see half-written."""
        self.fs.pipe_file(self.path(rel), data)

    def create_exclusive(self, rel: str, data: bytes) -> None:
        """Create ``rel`` only if it does not exist yet; FileExistsError otherwise. The write
        that makes incarnation numbers unique (``backend.conditional_writes`` says how)."""
        self.backend.create_exclusive(self.path(rel), data)

    def version(self, rel: str) -> str | None:
        """The store's version tag for ``rel`` (S3's ETag; None if missing or not offered), for
        a conditional replace with ``write_bytes_atomic(..., if_version=...)``."""
        return self.backend.version(self.path(rel))

    def list_dir(self, rel: str = "") -> list[str]:
        """Names (not paths) of the entries directly under ``rel``; [] if it does not exist.
        Entries the store lists but that hold nothing (S3 folder ghosts) are left out."""
        where = self.path(rel) if rel else self.root
        try:
            entries = self.fs.ls(where, detail=True, refresh=True)
        except FileNotFoundError:
            return []
        except TypeError:  # filesystems without the refresh flag
            entries = self.fs.ls(where, detail=True)
        return sorted(posixpath.basename(str(e["name"]).rstrip("/")) for e in entries if self.backend.listed(e))

    def remove(self, rel: str) -> None:
        """Delete one object or file; FileNotFoundError if it does not exist, PermissionError
        if the store kept it (S3's bulk delete reports refusals per key, which s3fs drops)."""
        self.fs.rm_file(self.path(rel))
        if self.backend.kept_after_delete(self.path(rel)):
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
        return self.backend.exists(self.path(rel))

    def remove_tree(self, rel: str) -> None:
        """Delete ``rel`` and everything under it; PermissionError if an object survived."""
        target = self.path(rel)
        if self.fs.exists(target) and self.backend.remove_tree(target):
            raise self._still_there(rel)

    def _still_there(self, rel: str) -> PermissionError:
        """A delete the store accepted but did not do: S3's bulk delete reports refusals per
        key, which s3fs drops."""
        return PermissionError(f"{self.display_url}/{rel} is still there after deleting it "
                               "(the credentials may not delete)")

    def makedirs(self, rel: str = "") -> None:
        self.backend.makedirs(self.path(rel) if rel else self.root)


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
