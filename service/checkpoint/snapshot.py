"""Staging: the in-memory copy of the state that an async save writes from.

Buffers are allocated once and reused (pinned on CUDA), so a save copies into warm memory.
Each rank copies only the tensors DCP has it write: DCP writes each replicated tensor from one
rank with a deterministic plan, so the share learnt from one save holds for the next, and
staging memory is about 1/world of the replicated state per rank.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import torch


class Staging:
    def __init__(self, pin_memory: bool):
        self.pin = pin_memory
        self.buffers: dict[str, torch.Tensor] = {}
        # Names of the tensors this rank wrote in its last save (None before the first).
        self.share: set[str] | None = None

    def copy(self, refs: dict[str, Any]) -> dict[str, Any]:
        """A snapshot of ``refs`` (state dicts of live tensors) in the staging buffers."""
        snapshot = {key: self._stage(value, key, copy=True) for key, value in refs.items()}
        if self.pin:
            torch.cuda.synchronize()
        return snapshot

    def allocate(self, refs: dict[str, Any]) -> None:
        """Make sure the buffers for ``refs`` exist, their pages faulted in; copies nothing."""
        for key, value in refs.items():
            self._stage(value, key, copy=False)

    def learn_share(self, planned: set[str] | None) -> None:
        """Remember which tensors DCP had this rank write; drop the buffers of the others."""
        if planned is None:  # DCP failed before it planned: nothing learnt
            return
        self.share = planned
        self.buffers = {k: v for k, v in self.buffers.items() if k in planned}

    def _stage(self, obj: Any, path: str, copy: bool) -> Any:
        """Copy tensors into their buffers. A tensor that another rank writes becomes a
        data-less placeholder of the same shape and dtype: DCP's plan stays the same on every
        rank, and should DCP ever ask this rank to write it after all, the save fails (it cannot
        read a placeholder) instead of writing weights that have moved on since the snapshot."""
        if isinstance(obj, torch.Tensor):
            if copy and self.share is not None and path not in self.share:
                return torch.empty(obj.shape, dtype=obj.dtype, device="meta")
            buf = self.buffers.get(path)
            if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                buf = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=self.pin)
                if not copy:
                    buf.zero_()
                self.buffers[path] = buf
            if copy:
                buf.copy_(obj.detach(), non_blocking=self.pin)
            return buf
        if isinstance(obj, dict):
            return {k: self._stage(v, f"{path}.{k}", copy) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._stage(v, f"{path}.{i}", copy) for i, v in enumerate(obj))
        return deepcopy(obj) if copy else None
