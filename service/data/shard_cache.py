"""Whole shards on this node's disk: downloaded once (one process per node does it; the others
wait on a lock), verified against the index's sha256, kept under a size limit, fetched ahead
of the training position, and retried with backoff on transient storage errors. The bytes it
reads count as storage progress in the worker's heartbeats, so a slow shard read is never
taken for a hang.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import fsspec

from service.data.images import BadImageError
from service.data.shard_index import ShardEntry
from service.errors import StorageError, UserError
from service.redact import redact_text, redact_url

log = logging.getLogger(__name__)
_CHUNK = 8 << 20
_INHERITED_CLIENTS: list[Any] = []  # a forked loader worker's, from its parent (see ShardCache.fs)


class BadShardError(BadImageError):
    """A shard is missing, truncated or not what the index says (its sha256 differs)."""


class ShardCache:
    def __init__(self, url: str, cache_dir: Path, limit_bytes: int, retry_s: float,
                 storage_options: dict[str, Any] | None = None):
        self.url, self.display_url = url.rstrip("/"), redact_url(url.rstrip("/"))
        self.cache_dir, self.limit_bytes, self.retry_s = cache_dir, limit_bytes, retry_s
        self.storage_options = dict(storage_options or {})
        self._fs: Any = None
        self._pid: int | None = None
        self._fs, self._root = fsspec.core.url_to_fs(self.url, **self._fs_kwargs())
        self._pid = os.getpid()
        self.local = "file" in (self._fs.protocol if isinstance(self._fs.protocol, tuple) else (self._fs.protocol,))
        # Shared with forked loader workers: the heartbeat reports what all of them read.
        self._bytes = multiprocessing.RawValue("q", 0)
        self._verified: set[str] = set()  # this process's (local data is read in place)
        self._ahead: concurrent.futures.ThreadPoolExecutor | None = None
        self._ahead_pid: int | None = None
        self._pending: dict[str, concurrent.futures.Future[Any]] = {}
        if not self.local:
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"the shard cache {cache_dir} cannot be created ({e.strerror or e}); set "
                                "data.cache_dir to a writable folder") from None

    def _fs_kwargs(self) -> dict[str, Any]:
        return {**self.storage_options, "skip_instance_cache": True}

    @property
    def fs(self) -> Any:
        """This process's filesystem: a forked loader worker opens its own (an s3fs client
        must not cross a fork)."""
        if self._pid != os.getpid():
            _INHERITED_CLIENTS.append(self._fs)  # never finalised here: it would close the parent's
            self._fs = fsspec.core.url_to_fs(self.url, **self._fs_kwargs())[0]
            self._pid = os.getpid()
            self._ahead, self._pending = None, {}
        return self._fs

    def __getstate__(self) -> dict[str, Any]:  # spawned workers: reopen, never pickle a client
        return {**self.__dict__, "_fs": None, "_pid": None, "_ahead": None, "_pending": {}}

    @property
    def bytes_read(self) -> int:
        return int(self._bytes.value)

    def remote(self, entry: ShardEntry) -> str:
        return f"{self._root}/{entry.name}"

    def where(self, entry: ShardEntry) -> str:
        """The shard's URL, without credentials (for messages)."""
        return f"{self.display_url}/{entry.name}"

    def path(self, entry: ShardEntry) -> Path:
        """The shard on this node's disk, verified; downloaded (or waited for) if need be."""
        if self.local:
            path = Path(self.remote(entry))
            if entry.name not in self._verified:
                self._check(path, entry, self._sha256(path, entry))
                self._verified.add(entry.name)
            return path
        path = self.cache_dir / entry.name.replace("/", "__")
        if path.exists():
            os.utime(path)  # recently used: evicted last
            return path
        with self._locked(path):
            if not path.exists():  # another process of this node may have fetched it meanwhile
                self._download(entry, path)
        self._evict(keep={path})
        return path

    def open(self, entry: ShardEntry) -> BinaryIO:
        """The shard, opened for reading (fetched again should another process of this node
        have evicted it between the check and the open)."""
        for _ in range(3):
            path = self.path(entry)
            try:
                return open(path, "rb")  # noqa: SIM115 (the caller keeps it open)
            except FileNotFoundError:
                continue
        raise StorageError(f"data shard {self.where(entry)} keeps leaving the cache {self.cache_dir} before it can be "
                           "read; raise data.cache_limit_gb")

    def prefetch(self, entries: list[ShardEntry]) -> None:
        """Fetch these shards in the background (errors surface when the shard is read)."""
        if self.local:
            return
        _ = self.fs  # a forked worker: its own client and thread pool first
        if self._ahead is None or self._ahead_pid != os.getpid():
            self._ahead = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="ftdiff-shards")
            self._ahead_pid, self._pending = os.getpid(), {}
        for entry in entries:
            done = self._pending.get(entry.name)
            if done is None or done.done():
                self._pending[entry.name] = self._ahead.submit(self._quiet_path, entry)

    def _quiet_path(self, entry: ShardEntry) -> None:
        with contextlib.suppress(Exception):
            self.path(entry)

    def _download(self, entry: ShardEntry, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        deadline, delay = time.monotonic() + self.retry_s, 1.0
        while True:
            try:
                digest = hashlib.sha256()
                with self.fs.open(self.remote(entry), "rb", block_size=_CHUNK) as src, open(tmp, "wb") as dst:
                    for block in iter(lambda: src.read(_CHUNK), b""):
                        dst.write(block)
                        digest.update(block)
                        self._bytes.value += len(block)
                break
            except FileNotFoundError:
                tmp.unlink(missing_ok=True)
                raise BadShardError(f"data shard {self.where(entry)} is missing (the index lists it); restore it, "
                                    "or set data.on_bad_image = \"skip\"") from None
            except PermissionError as e:
                tmp.unlink(missing_ok=True)
                raise StorageError(f"data shard {self.where(entry)} cannot be read: access denied "
                                   f"({_gist(e)})") from None
            except OSError as e:  # throttling, 5xx, timeouts, a dropped connection: try again
                tmp.unlink(missing_ok=True)
                if time.monotonic() + delay > deadline:
                    raise StorageError(f"data shard {self.where(entry)} cannot be read after {self.retry_s:.0f}s "
                                       f"of retries ({_gist(e)})") from None
                log.warning("reading data shard %s failed (%s); retrying in %.0fs", self.where(entry), _gist(e), delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        try:
            self._check(tmp, entry, digest.hexdigest())
        except BadShardError:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)

    def _sha256(self, path: Path, entry: ShardEntry) -> str:
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(_CHUNK), b""):
                    digest.update(block)
                    self._bytes.value += len(block)
        except FileNotFoundError:
            raise BadShardError(f"data shard {self.where(entry)} is missing (the index lists it); restore it, or "
                                "set data.on_bad_image = \"skip\"") from None
        return digest.hexdigest()

    def _check(self, path: Path, entry: ShardEntry, sha256: str) -> None:
        if sha256 != entry.sha256:
            size = path.stat().st_size
            what = "truncated" if size < entry.bytes else "changed"
            raise BadShardError(f"data shard {self.where(entry)} is {what} since it was indexed ({size} bytes, "
                                f"sha256 {sha256[:12]}..., the index says {entry.bytes} bytes, "
                                f"{entry.sha256[:12]}...); restore it, or set data.on_bad_image = \"skip\"")

    @contextlib.contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        """This node's lock on one shard. While another process holds it (downloading), the
        bytes arriving in its partial file count as this process's progress too: a rank that
        waits for its neighbour's download is not hung."""
        with open(path.with_name(f".{path.name}.lock"), "w") as lock:
            seen = 0
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    arrived = sum(_size(p) for p in path.parent.glob(f".{path.name}.*.part"))
                    if arrived > seen:
                        self._bytes.value += arrived - seen
                        seen = arrived
                    time.sleep(0.2)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _evict(self, keep: set[Path]) -> None:
        """Delete the least recently used shards while the cache is over its limit (a process
        still reading one keeps its open file)."""
        shards = []
        for p in self.cache_dir.glob("*"):
            if p.name.startswith("."):
                continue
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                shards.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in shards)
        for _, size, p in sorted(shards, key=lambda s: s[0]):
            if total <= self.limit_bytes:
                break
            if p not in keep:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                total -= size


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # renamed into place meanwhile
        return 0


def _gist(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return redact_text(f"{type(e).__name__}: {lines[0][:200] if lines else ''}")
