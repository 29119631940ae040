"""A write stream to S3 that uploads as it goes: parts in flight while the next ones are written.

s3fs's file object keeps a whole part (50 MiB by default) in memory, uploads it from the
writing thread, and sends a file smaller than that as one PUT when it is closed: a checkpoint
shard is serialised first and uploaded after, one stream at a time per file. Here every
``PART_SIZE`` bytes become an ``UploadPart`` on s3fs's event loop at once, up to
``PARTS_IN_FLIGHT`` per stream, so serialising, checksumming and uploading overlap and a file
is sent over several connections, as boto3's transfer manager sends one
(bench/checkpoint.py: the commit against a raw boto3 upload of the same bytes). Files up to
``SINGLE_PUT_LIMIT`` are still one PUT (fewer round trips to a distant store).

Nothing is visible under the key until the stream is closed without an error: the upload is
then completed (or, for a file of up to ``SINGLE_PUT_LIMIT``, sent as one PUT). An error, or a close
after an error, aborts the multipart upload. A process killed mid-upload leaves an incomplete
upload behind, invisible to listings; a bucket lifecycle rule (AbortIncompleteMultipartUpload)
reclaims its space (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections import deque
from concurrent.futures import Future
from typing import Any

import crc32c

PART_SIZE = 8 * 2**20  # S3's minimum is 5 MiB (all parts but the last); boto3's default is 8
# A file up to this size is one PUT once it is closed, as s3fs sends it: a multipart upload costs
# two more round trips (create, complete), which a store far away pays in full (an emergency
# save within its grace period). Larger files go up in parts, while they are written.
SINGLE_PUT_LIMIT = 50 * 2**20
PARTS_IN_FLIGHT = 4  # per stream; a rank writes checkpoint.writer_threads streams at once
MAX_PARTS = 10_000  # S3's limit per upload
# Parts grow so that a file of any size fits in MAX_PARTS: PART_SIZE for the first
# PARTS_PER_SIZE parts, twice that for the next PARTS_PER_SIZE, and so on (16, 32, 64 GiB ...).
PARTS_PER_SIZE = 2000


def part_size(number: int) -> int:
    """The size of part ``number`` (1-based) of an upload."""
    return PART_SIZE << ((number - 1) // PARTS_PER_SIZE)


def part_checksum(body: bytes | bytearray) -> str:
    """The ``x-amz-checksum-crc32c`` of ``body``: the store checks every part against it."""
    return base64.b64encode(crc32c.crc32c(body).to_bytes(4, "big")).decode()


class MultipartStream(io.RawIOBase):
    """Writable stream to ``bucket/key`` through an s3fs filesystem's client and loop."""

    def __init__(self, fs: Any, bucket: str, key: str):
        self.fs, self.bucket, self.key = fs, bucket, key
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
            if (len(self.held) + 1) * PART_SIZE <= SINGLE_PUT_LIMIT:  # (only full parts come here)
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
        if self.upload_id is None:  # up to SINGLE_PUT_LIMIT: one PUT, as s3fs does
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
