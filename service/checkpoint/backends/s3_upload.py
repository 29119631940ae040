"""A write stream to S3 that uploads as it goes: parts in flight while the next ones are written.

s3fs's file object keeps a whole part (50 MiB by default) in memory, uploads it from the
writing thread, and sends a file smaller than that as one PUT when it is closed: a checkpoint
shard is serialised first and uploaded after, one stream at a time per file. Here every
``PART_SIZE`` bytes become an ``UploadPart`` on s3fs's event loop at once, up to
``PARTS_IN_FLIGHT`` per stream, so serialising, checksumming and uploading overlap and a file
is sent over several connections, as boto3's transfer manager sends one
(bench/checkpoint.py: the commit against a raw boto3 upload of the same bytes). A multipart
upload costs two round trips more than one PUT (create, complete), which pays off only for a
file large enough against the store's round-trip time: ``RoundTrip`` measures that time once, in
the background, and ``single_put_limit`` turns it into the size up to which a file is still one
PUT (at most ``SINGLE_PUT_LIMIT``, the bound used while nothing is measured yet).

Nothing is visible under the key until the stream is closed without an error: the upload is
then completed (or, for a file under the single-PUT limit, sent as one PUT). An error, or a close
after an error, aborts the multipart upload. A process killed mid-upload leaves an incomplete
upload behind, invisible to listings; a bucket lifecycle rule (AbortIncompleteMultipartUpload)
reclaims its space (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

import crc32c

PART_SIZE = 8 * 2**20  # S3's minimum is 5 MiB (all parts but the last); boto3's default is 8
# The largest file sent as one PUT once it is closed (s3fs's own bound): a store far away pays
# a multipart upload's two extra round trips in full (an emergency save within its grace
# period). Larger files always go up in parts, while they are written.
SINGLE_PUT_LIMIT = 50 * 2**20
# What one connection to a store carries, for the break-even below: S3 gives 50-100 MB/s per
# connection in-region; a store on the same host or rack more. Guessing high errs towards one
# PUT, the safe side for a distant store.
CONNECTION_BYTES_PER_S = 100e6
PARTS_IN_FLIGHT = 4  # per stream; a rank writes checkpoint.writer_threads streams at once
MAX_PARTS = 10_000  # S3's limit per upload
# Parts grow so that a file of any size fits in MAX_PARTS: PART_SIZE for the first
# PARTS_PER_SIZE parts, twice that for the next PARTS_PER_SIZE, and so on (16, 32, 64 GiB ...).
PARTS_PER_SIZE = 2000


def part_size(number: int) -> int:
    """The size of part ``number`` (1-based) of an upload."""
    return PART_SIZE << ((number - 1) // PARTS_PER_SIZE)


def single_put_limit(round_trip_s: float | None) -> int:
    """Up to how many bytes a file is one PUT, for a store ``round_trip_s`` away (None: unknown).

    Parts save about ``(1 - 1/PARTS_IN_FLIGHT)`` of a file's transfer time and cost two round
    trips: they pay off above ``2 * rtt * rate * n / (n - 1)`` bytes. 1 ms away (a store on the
    same host) that is 0.3 MB, so every file of a part or more goes up in parts; 200 ms or more
    away, files up to ``SINGLE_PUT_LIMIT`` stay single PUTs.
    """
    if round_trip_s is None:
        return SINGLE_PUT_LIMIT
    break_even = 2 * round_trip_s * CONNECTION_BYTES_PER_S * PARTS_IN_FLIGHT / (PARTS_IN_FLIGHT - 1)
    return int(min(SINGLE_PUT_LIMIT, break_even))


class RoundTrip:
    """A store's round-trip time: the fastest of a few HEAD requests of a bucket, sent once in
    the background on s3fs's loop (the first one also pays for the connection). Until it is
    known, or where the store refuses HEAD, streams keep to ``SINGLE_PUT_LIMIT``."""

    PROBES = 3

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._future: Future[float] | None = None

    def start(self, fs: Any, bucket: str) -> None:
        with self._lock:
            if self._future is None:
                self._future = asyncio.run_coroutine_threadsafe(self._measure(fs, bucket), fs.loop)

    def seconds(self) -> float | None:
        """The measured time, or None while it is being measured or could not be."""
        future = self._future
        if future is None or not future.done() or future.cancelled() or future.exception() is not None:
            return None
        return future.result()

    def wait(self, timeout: float) -> float | None:
        """The measured time, waiting up to ``timeout`` seconds for it (tests, benchmarks)."""
        future = self._future
        if future is not None:
            try:
                future.result(timeout)
            except Exception:  # noqa: BLE001 - unmeasured is an answer (None), not an error
                pass
        return self.seconds()

    @classmethod
    async def _measure(cls, fs: Any, bucket: str) -> float:
        fastest = float("inf")
        for _ in range(cls.PROBES):
            started = time.monotonic()
            await fs._call_s3("head_bucket", Bucket=bucket)
            fastest = min(fastest, time.monotonic() - started)
        return fastest


def part_checksum(body: bytes | bytearray) -> str:
    """The ``x-amz-checksum-crc32c`` of ``body``: the store checks every part against it."""
    return base64.b64encode(crc32c.crc32c(body).to_bytes(4, "big")).decode()


class MultipartStream(io.RawIOBase):
    """Writable stream to ``bucket/key`` through an s3fs filesystem's client and loop."""

    def __init__(self, fs: Any, bucket: str, key: str, round_trip: RoundTrip | None = None):
        self.fs, self.bucket, self.key = fs, bucket, key
        self.round_trip = round_trip
        self.single_put_limit: int | None = None  # decided when the first part is full
        self.part = bytearray(part_size(1))  # the part being filled, sent as it is when full
        self.filled = 0
        self.size = 0
        self.upload_id: str | None = None
        self.in_flight: deque[tuple[str, Future[dict[str, Any]]]] = deque()
        self.parts: list[dict[str, Any]] = []
        self.held: list[bytearray] = []  # full parts kept back while the file may still be one PUT
        self.failed = False

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        taken = 0
        while taken < len(view):  # one copy: into the part being filled
            room = len(self.part) - self.filled
            chunk = view[taken:taken + room]
            self.part[self.filled:self.filled + len(chunk)] = chunk
            self.filled += len(chunk)
            taken += len(chunk)
            if self.filled == len(self.part):
                self._send_part()
        self.size += len(view)
        return len(view)

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self.failed:
                self._finish()
        except BaseException:
            self.failed = True
            raise
        finally:
            if self.failed:
                self._abort()
            super().close()

    def __del__(self) -> None:
        # Only an explicit close() completes the upload: a stream dropped unclosed (its
        # writer failed somewhere) must not publish what it had.
        if not self.closed:
            self.failed = True
        super().__del__()

    def abort(self) -> None:
        """The write failed: nothing may appear under the key (``close`` then aborts)."""
        self.failed = True

    def _run(self, method: str, **kwargs: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(
            self.fs._call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs), self.fs.loop)

    def _send_part(self) -> None:
        if self.upload_id is None:
            if self.single_put_limit is None:
                self.single_put_limit = single_put_limit(self.round_trip.seconds() if self.round_trip else None)
            if (len(self.held) + 1) * PART_SIZE <= self.single_put_limit:  # (only full parts come here)
                self.held.append(self.part)  # may still end as one PUT
                self.part, self.filled = bytearray(part_size(len(self.held) + 1)), 0
                return
            self.upload_id = self._run("create_multipart_upload", ChecksumAlgorithm="CRC32C").result()["UploadId"]
            held, self.held = self.held, []
            for full in held:  # the parts kept back go first, in order
                self._send(full)
        self._send(self.part if self.filled == len(self.part) else self.part[:self.filled])
        self.part, self.filled = bytearray(part_size(len(self.parts) + len(self.in_flight) + 1)), 0

    def _send(self, body: bytearray) -> None:
        number = len(self.parts) + len(self.in_flight) + 1
        if number > MAX_PARTS:
            raise OSError(f"s3://{self.bucket}/{self.key}: more than {MAX_PARTS} parts")
        while len(self.in_flight) >= PARTS_IN_FLIGHT:
            self._collect_oldest()
        checksum = part_checksum(body)  # here, in the writer's thread, not on the shared loop
        self.in_flight.append((checksum, self._run("upload_part", PartNumber=number, UploadId=self.upload_id,
                                                   Body=body, ChecksumCRC32C=checksum)))

    def _collect_oldest(self) -> None:
        checksum, future = self.in_flight.popleft()
        answer = future.result()  # the part's error, after s3fs's own retries
        # Parts are collected in the order they were sent, so this is the part's number.
        self.parts.append({"PartNumber": len(self.parts) + 1, "ETag": answer["ETag"], "ChecksumCRC32C": checksum})

    def _finish(self) -> None:
        if self.upload_id is None:  # under the single-PUT limit: one PUT, as s3fs does
            body = b"".join([*self.held, self.part[:self.filled]])
            self._run("put_object", Body=body, ChecksumCRC32C=part_checksum(body)).result()
            return
        if self.filled:
            self._send_part()
        while self.in_flight:
            self._collect_oldest()
        self._run("complete_multipart_upload", UploadId=self.upload_id,
                  MultipartUpload={"Parts": self.parts}).result()
        self.upload_id = None

    def _abort(self) -> None:
        for _, future in self.in_flight:
            future.cancel()
        self.in_flight.clear()
        if self.upload_id is None:
            return
        try:
            self._run("abort_multipart_upload", UploadId=self.upload_id).result()
        except Exception:  # noqa: BLE001 - best effort: the upload stays incomplete and invisible
            pass
        self.upload_id = None
