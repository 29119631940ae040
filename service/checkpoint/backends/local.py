"""The local disk (and anything mounted on it: NFS, Lustre, a PVC): rename, O_EXCL, fsync."""

from __future__ import annotations

import errno
import os
from typing import Any, ClassVar

from service.checkpoint.backends.base import EXCLUSIVE_CREATE, Backend


class LocalBackend(Backend):
    protocols: ClassVar[tuple[str, ...]] = ("file", "local")
    conditional_writes: ClassVar[str] = EXCLUSIVE_CREATE
    on_local_disk: ClassVar[bool] = True

    @staticmethod
    def fs_kwargs(options: Any) -> dict[str, Any]:
        return {"auto_mkdir": True}

    def write_atomic(self, path: str, data: bytes, if_version: str | None = None) -> None:
        # Durable before it becomes visible: the manifest and the pointer are what make a
        # checkpoint committed, so they must survive a power loss as the shards do.
        tmp = f"{path}.tmp-{os.urandom(4).hex()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX, unlike fs.mv on some versions
        fsync_dir(os.path.dirname(path))

    def create_exclusive(self, path: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write", path)
            os.fsync(fd)
        except BaseException:
            # Ours (O_EXCL) and incomplete (a full disk): an empty record would claim the
            # name for nobody, and every later start would take it for a newer owner.
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        fsync_dir(os.path.dirname(path))


def fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (POSIX: the directory entry is in the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
