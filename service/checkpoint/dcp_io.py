"""torch.distributed.checkpoint storage classes that checksum while writing and verify on read.

The writer wraps every stream DCP opens so each file's size and CRC-32 are known the moment it
is closed — the manifest never needs a read-back. The reader reads each file once, whole,
checks it against the manifest before DCP deserialises any of it, and hands DCP an in-memory
copy to slice from; a corrupt or truncated shard therefore fails the load instead of loading
garbage weights.
"""

from __future__ import annotations

import io
import os
import threading
import zlib
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter

from service.checkpoint.manifest import FileEntry


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file does not match its manifest entry."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class _HashingStream(io.RawIOBase):
    """Write-through stream that keeps a running CRC-32 and byte count."""

    def __init__(self, inner: Any):
        self.inner, self.crc, self.size = inner, 0, 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        self.crc = zlib.crc32(view, self.crc)
        self.size += len(view)
        self.inner.write(view)
        return len(view)

    def tell(self) -> int:
        return self.size

    def fileno(self) -> int:
        return self.inner.fileno()

    def flush(self) -> None:
        self.inner.flush()


class _SharedFs(FileSystem):
    """DCP's fsspec FileSystem bound to an fsspec instance we already hold (with our options)."""

    def __init__(self, fs: Any):
        super().__init__()
        self.fs = fs

    def init_path(self, path: str | os.PathLike, **kwargs: Any) -> str | os.PathLike:
        return path


class _HashingFs(_SharedFs):
    def __init__(self, fs: Any):
        super().__init__(fs)
        self.entries: dict[str, FileEntry] = {}
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with super().create_stream(path, mode) as stream:
            hashing = _HashingStream(stream)
            yield hashing  # type: ignore[misc]
        with self._lock:
            self.entries[os.path.basename(os.fspath(path))] = FileEntry(
                hashing.size, f"{hashing.crc & 0xFFFFFFFF:08x}"
            )

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)
        with self._lock:
            entry = self.entries.pop(os.path.basename(os.fspath(path)), None)
            if entry is not None:
                self.entries[os.path.basename(os.fspath(new_path))] = entry


class ChecksummingWriter(FsspecWriter):
    """FsspecWriter that records (size, crc32) of every file it writes, by file name."""

    def __init__(self, fs: Any, path: str, *, object_store: bool, thread_count: int = 1):
        # No fsync on object stores: a finished PUT is durable, and fsync is meaningless there.
        super().__init__(
            path,
            single_file_per_rank=True,
            sync_files=not object_store,
            thread_count=thread_count,
            overwrite=False,
        )
        self.fs = _HashingFs(fs)
        self.path = path

    @property
    def written(self) -> dict[str, FileEntry]:
        return dict(self.fs.entries)


class _VerifyingFs(_SharedFs):
    def __init__(self, fs: Any, expected: dict[str, FileEntry]):
        super().__init__(fs)
        self.expected = expected

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        yield io.BytesIO(read_verified(self.fs, os.fspath(path), self.expected))


def read_verified(fs: Any, path: str, expected: dict[str, FileEntry]) -> bytes:
    """The whole file, after checking its size and CRC-32 against the manifest entry."""
    name = os.path.basename(path)
    entry = expected.get(name)
    if entry is None:
        raise CorruptCheckpointError(path, "file is not listed in the manifest")
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise CorruptCheckpointError(path, "file is missing") from None
    if len(data) != entry.size:
        raise CorruptCheckpointError(path, f"size {len(data)} != {entry.size} in the manifest")
    crc = f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"
    if crc != entry.crc32:
        raise CorruptCheckpointError(path, f"crc32 {crc} != {entry.crc32} in the manifest")
    return data


class VerifyingReader(FsspecReader):
    """FsspecReader that refuses any file whose bytes differ from the manifest."""

    def __init__(self, fs: Any, path: str, expected: dict[str, FileEntry]):
        super().__init__(path)
        self.fs = _VerifyingFs(fs, expected)
        self.path = path
