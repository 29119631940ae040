"""torch.distributed.checkpoint storage classes that checksum while writing and verify on read.

Checksums are CRC-32C (hardware-accelerated, ~10 GB/s; the checksum S3 and GCS use too). The
writer wraps every stream DCP opens so each file's size and CRC-32C are known the moment it is
closed — the manifest never needs a read-back. On object stores the reader fetches each file
once, whole (one GET instead of a ranged GET per tensor), checks it against the manifest before
DCP deserialises any of it, and lets DCP slice the verified bytes in memory. On local and
network file systems, where DCP reads slices cheaply from the page cache, each rank instead
verifies its share of the files through mmap before the load (``verify_local_file``, run by ``resume``).
"""

from __future__ import annotations

import dataclasses
import io
import mmap
import os
import threading
from collections.abc import Callable, Generator
from contextlib import contextmanager
from typing import Any

import crc32c
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter
from torch.distributed.checkpoint.planner import WriteItemType

from service.checkpoint.errors import CorruptCheckpointError
from service.checkpoint.manifest import FileEntry
from service.checkpoint.safe_pickle import SafeFileSystemReader, is_plain_name
from service.checkpoint.storage import Storage


class ByteCounter:
    """Checkpoint bytes the readers and writers given it have moved (only ever grows): the
    Checkpointer's is in the worker's heartbeats, where the supervisor takes a change as
    progress inside a long load or save; a command's drives its byte bar."""

    def __init__(self) -> None:
        self.total = 0

    def add(self, count: int) -> None:
        self.total += count  # a lost update between threads only delays a heartbeat's news


def crc32c_hex(data: Any) -> str:
    return f"{crc32c.crc32c(data):08x}"


class _HashingStream(io.RawIOBase):
    """Write-through stream that keeps a running CRC-32C and byte count."""

    def __init__(self, inner: Any, counter: ByteCounter):
        self.inner, self.size, self.counter = inner, 0, counter
        self.crc = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        self.crc = crc32c.crc32c(view, self.crc)
        self.size += len(view)
        self.inner.write(view)
        self.counter.add(len(view))
        return len(view)

    def tell(self) -> int:
        return self.size

    def fileno(self) -> int:
        # DCP fsyncs this descriptor: bytes still in the inner stream's buffer would not be
        # covered, so after a power loss the newest commit would fail its CRC. Flush first.
        self.inner.flush()
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
    def __init__(self, fs: Any, counter: ByteCounter, open_for_write: Callable[[str], Any] | None = None):
        super().__init__(fs)
        self.counter = counter
        # The backend's write stream (on S3: parts uploaded while the file is written).
        self.open_for_write = open_for_write
        self.entries: dict[str, FileEntry] = {}
        self._lock = threading.Lock()
        # Runs before every change this writer makes to storage (see ownership): a writer of an
        # older start must not create, replace or delete a single file.
        self.fence: Any = lambda what: None

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        self.fence(f"writing {os.path.basename(os.fspath(path))}")
        with self._open_for_write(path, mode) as stream:
            hashing = _HashingStream(stream, self.counter)
            yield hashing  # type: ignore[misc]
        with self._lock:
            self.entries[os.path.basename(os.fspath(path))] = FileEntry(
                hashing.size, f"{hashing.crc:08x}"
            )

    @contextmanager
    def _open_for_write(self, path: str | os.PathLike, mode: str) -> Generator[Any, None, None]:
        if self.open_for_write is None:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with self.open_for_write(os.fspath(path)) as stream:
            try:
                yield stream
            except BaseException:  # as DCP's own stream does: no half-written file left
                try:
                    self.rm_file(path)
                except Exception:  # noqa: BLE001 - the write's own error is the one to raise
                    pass
                raise

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        self.fence(f"renaming to {os.path.basename(os.fspath(new_path))}")
        super().rename(path, new_path)
        with self._lock:
            entry = self.entries.pop(os.path.basename(os.fspath(path)), None)
            if entry is not None:
                self.entries[os.path.basename(os.fspath(new_path))] = entry

    def rm_file(self, path: str | os.PathLike) -> None:
        self.fence(f"deleting {os.path.basename(os.fspath(path))}")
        super().rm_file(path)


@contextmanager
def _zip_crc32_off() -> Generator[None, None, None]:
    """Skip the zip CRC-32 that torch.save computes (in software) for every record.

    Our CRC-32C covers every byte of every file and is checked before a load; the zip one is
    only checked by unzip tools, never by torch.load, and costs more than ours.
    """
    try:
        from torch.utils.serialization import config
    except ImportError:  # a torch without the switch: keep its default
        yield
        return
    previous = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = previous


class ChecksummingWriter(FsspecWriter):
    """FsspecWriter that records (size, crc32c) of every file it writes, by file name."""

    @classmethod
    def for_folder(cls, storage: Storage, rel: str, *, thread_count: int = 1, file_tag: str = "",
                   counter: ByteCounter | None = None) -> "ChecksummingWriter":
        """A writer for the folder ``rel`` of ``storage`` (fsync on file systems only)."""
        return cls(storage.fs, storage.path(rel), object_store=storage.backend.object_store,
                   thread_count=thread_count, file_tag=file_tag, counter=counter,
                   open_for_write=storage.backend.open_for_write)

    def __init__(self, fs: Any, path: str, *, object_store: bool, thread_count: int = 1, file_tag: str = "",
                 counter: ByteCounter | None = None, open_for_write: Callable[[str], Any] | None = None):
        # No fsync on object stores: a finished PUT is durable, and fsync is meaningless there.
        super().__init__(
            path,
            single_file_per_rank=True,
            sync_files=not object_store,
            thread_count=thread_count,
            overwrite=False,
        )
        self.fs = _HashingFs(fs, counter or ByteCounter(), open_for_write)
        self.path = path
        # Part of every shard file name (e.g. the writer's incarnation), so a leftover writer of
        # an older start can never overwrite the files of a newer one.
        self.file_tag = file_tag
        # This rank's tensors in DCP's final plan, once it has planned (the snapshot learns it).
        self.planned_tensors: set[str] | None = None

    def write_data(self, plan: Any, planner: Any) -> Any:
        if self.file_tag and getattr(plan.storage_data, "prefix", None):
            # DCP names shard files "<prefix><n>.distcp" with prefix "__<rank>_".
            tagged = dataclasses.replace(plan.storage_data, prefix=f"{plan.storage_data.prefix}{self.file_tag}_")
            plan = dataclasses.replace(plan, storage_data=tagged)
        self.planned_tensors = {
            item.index.fqn for item in plan.items if item.type != WriteItemType.BYTE_IO
        }
        with _zip_crc32_off():
            written = super().write_data(plan, planner)
        # DCP's extra writer threads (thread_count > 1) die silently on an error: their items
        # are then simply missing from the results, and DCP would go on to write .metadata
        # for a checkpoint that cannot be loaded. Refuse to continue instead.
        results = written.value()
        missing = {item.index for item in plan.items} - {result.index for result in results}
        if missing:
            example = sorted(str(index.fqn) for index in missing)[0]
            raise OSError(
                f"{len(missing)} of {len(plan.items)} checkpoint items were not written (a writer "
                f"thread failed; e.g. {example}); see the error logged above"
            )
        return written

    @property
    def written(self) -> dict[str, FileEntry]:
        return dict(self.fs.entries)


class _VerifyingFs(_SharedFs):
    def __init__(self, fs: Any, expected: dict[str, FileEntry], counter: ByteCounter):
        super().__init__(fs)
        self.expected, self.counter = expected, counter

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        yield io.BytesIO(read_verified(self.fs, os.fspath(path), self.expected, self.counter))


def _check(path: str, entry: FileEntry, size: int, data: Any) -> None:
    if size != entry.size:
        raise CorruptCheckpointError(path, f"size {size} != {entry.size} in the manifest")
    crc = crc32c_hex(data)
    if crc != entry.crc32c:
        raise CorruptCheckpointError(path, f"crc32c {crc} != {entry.crc32c} in the manifest")


def _entry(path: str, expected: dict[str, FileEntry]) -> FileEntry:
    """The manifest entry for ``path``, looked up by file name.

    The names are untrusted, and callers build paths from them: ``catalog.verify`` joins each
    one to the folder, so ``../x`` or ``/x`` would lead the read elsewhere while a plain ``x``
    beside it supplied the entry the lookup by base name finds. A manifest with any name that
    is not a plain file name is therefore refused whole, before any read.
    """
    unsafe = next((name for name in expected if not is_plain_name(name)), None)
    if unsafe is not None:
        raise CorruptCheckpointError(path, f"the manifest lists {unsafe!r}, which is not a plain file name")
    entry = expected.get(os.path.basename(path))
    if entry is None:
        raise CorruptCheckpointError(path, "file is not listed in the manifest")
    return entry


def read_verified(fs: Any, path: str, expected: dict[str, FileEntry], counter: ByteCounter | None = None) -> bytes:
    """The whole file, after checking its size and CRC-32C against the manifest entry."""
    entry = _entry(path, expected)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise CorruptCheckpointError(path, "file is missing") from None
    if counter is not None:
        counter.add(len(data))
    _check(path, entry, len(data), data)
    return data


def read_verified_file(storage: Storage, rel: str, expected: dict[str, FileEntry],
                       counter: ByteCounter | None = None) -> bytes:
    """``read_verified`` for the file ``rel`` of ``storage``."""
    return read_verified(storage.fs, storage.path(rel), expected, counter)


def verify_local_file(path: str, expected: dict[str, FileEntry], counter: ByteCounter | None = None) -> None:
    """Check a local file without copying it: CRC-32C over an mmap of the page cache."""
    entry = _entry(path, expected)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                _check(path, entry, 0, b"")
                return
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                _check(path, entry, size, mm)
            if counter is not None:
                counter.add(size)
    except FileNotFoundError:
        raise CorruptCheckpointError(path, "file is missing") from None


class VerifyingReader(SafeFileSystemReader, FsspecReader):
    """FsspecReader that refuses any file whose bytes differ from the manifest.

    The manifest's CRC-32C does not make the bytes trustworthy (whoever can write the bucket
    can write the manifest too), so what they hold is read without running code from them
    (see ``safe_pickle``).
    """

    @classmethod
    def for_folder(cls, storage: Storage, rel: str, expected: dict[str, FileEntry],
                   counter: ByteCounter | None = None) -> "VerifyingReader":
        return cls(storage.fs, storage.path(rel), expected, counter)

    def __init__(self, fs: Any, path: str, expected: dict[str, FileEntry], counter: ByteCounter | None = None):
        super().__init__(path)
        self.fs = _VerifyingFs(fs, expected, counter or ByteCounter())
        self.path = path
