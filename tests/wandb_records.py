"""Read a W&B run file (``run-<id>.wandb``, written offline) back: its history rows.

The file is W&B's own record log: a 7-byte header (``:W&B``, a magic number, a version), then
LevelDB-log blocks of 32 KiB whose records (CRC, length, kind: full, first, middle, last) carry
protobuf ``Record`` messages. wandb ships the message types but, since its core moved to Go,
no Python reader.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(raw):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # a block's tail too short for a record header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + HEADER])
        if kind == 0 and length == 0:
            break
        pending += raw[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def history(path: Path) -> list[dict[str, Any]]:
    """Every logged row: ``{key: value}`` (nested keys joined with "/"), values decoded from JSON."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows
