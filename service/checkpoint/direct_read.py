"""A DCP reader for local files that reads each tensor straight into its destination.

DCP's ``FileSystemReader`` deserialises every tensor item with ``torch.load`` (page cache ->
a fresh tensor) and then copies it into the tensor being loaded: two copies of every byte,
plus an allocation per tensor. This reader asks ``torch.load`` only for the item's metadata
(``map_location="meta"`` reads the small pickle and the zip header, not the data, and reports
where the data record starts) and then ``preadv``s the record into the destination's memory:
one copy. That saving pays for the CRC-32C verification of the load (see ``resume``), so a
verified resume costs no more than DCP's unverified one.

Anything outside the simple case — a destination on an accelerator or not contiguous, a
resharded slice, a dtype change, a saved view of a larger storage, a torch without the
metadata-only load — goes through DCP's own path unchanged, as does every non-tensor item.
Both that path and the ``.metadata`` read are ``SafeFileSystemReader``'s, which never runs
code from the checkpoint (see ``safe_pickle``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _create_file_view
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem

from service.checkpoint.safe_pickle import SafeFileSystemReader


class DirectFileReader(SafeFileSystemReader):
    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        fallback: list[ReadItem] = []
        for relative_path, reqs in self._by_file(plan.items):
            path = os.path.join(os.fspath(self.path), relative_path)
            with open(path, "rb", buffering=0) as stream:
                for req in reqs:
                    if not self._read_direct(stream, req, planner):
                        fallback.append(req)
        if fallback:
            return super().read_data(LoadPlan(fallback, plan.storage_data, plan.planner_data), planner)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _by_file(self, items: Iterable[ReadItem]) -> list[tuple[str, list[ReadItem]]]:
        """Requests grouped by file, each group in file order (sequential reads)."""
        per_file: dict[str, list[ReadItem]] = {}
        for item in items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        return [
            (name, sorted(reqs, key=lambda r: self.storage_data[r.storage_index].offset))
            for name, reqs in per_file.items()
        ]

    def _read_direct(self, stream: Any, req: ReadItem, planner: LoadPlanner) -> bool:
        """Read one tensor item into its destination; False if it needs DCP's general path."""
        info = self.storage_data[req.storage_index]
        if req.type != LoadItemType.TENSOR or info.transform_descriptors:
            return False
        view = _create_file_view(stream, info.offset, info.length)
        try:
            saved = torch.load(view, map_location="meta", weights_only=True)
        except Exception:  # not a plain tensor record (or an older torch): DCP decides
            return False
        storage = saved.untyped_storage()
        data_offset = getattr(storage, "_checkpoint_offset", None)
        target = planner.resolve_tensor(req).detach()
        whole = all(o == 0 for o in req.storage_offsets) and tuple(req.lengths) == tuple(saved.shape)
        if (
            data_offset is None
            or not whole
            or target.device.type != "cpu"
            or not target.is_contiguous()
            or not saved.is_contiguous()
            or saved.storage_offset() != 0
            or target.dtype != saved.dtype
            or target.shape != saved.shape
            or storage.nbytes() != saved.numel() * saved.element_size()
        ):
            return False
        _pread_exactly(stream.fileno(), _bytes_of(target), info.offset + data_offset)
        planner.commit_tensor(req, target)
        return True


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory."""
    if tensor.numel() == 0:
        return memoryview(bytearray())
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _pread_exactly(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise EOFError(f"file ends {len(buf) - done} bytes before the end of a tensor record")
        done += n
