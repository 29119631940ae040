"""How long this rank's own compute of a step takes, and how long its gradient communication
takes — the straggler signals its heartbeats carry (the supervisor compares ranks:
``ftdiff_rank_relative_speed``, and exports both times per rank).

Compute is the forward pass of each micro-batch: work with no collective in it (DDP's buffer
broadcast is off, see service/train/denoiser.py), so a rank waiting for a slow peer in the
gradient all-reduce does not look slow itself. Communication is the span from the first
gradient bucket DDP hands to the all-reduce to the last one reduced (a DDP communication hook
doing DDP's own all-reduce, bit for bit at any world size; the span overlaps the backward pass of the
layers whose buckets come later): it includes waiting for the slowest peer,
so a straggler's peers show long communication and the straggler a short one. On CUDA both
are read from events once the GPU has passed them (never a synchronize in the step);
elsewhere from the clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

# Weight of the newest step in the running means (a few steps smooth out noise, a persistently
# slow rank shows within about ten).
_SMOOTHING = 0.3


class _Marks:
    """Time marks of one kind within a step: clock readings, or CUDA events read later."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.pending: list[tuple[Any, Any]] = []  # (start, end) marks not yet folded in
        self.mean_s = 0.0
        self._lock = threading.Lock()  # an all-reduce's future completes on another thread

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, start: Any, end: Any) -> None:
        with self._lock:
            self.pending.append((start, end))

    def fold(self, span: bool) -> None:
        """Fold the finished marks into the running mean: their summed durations, or (``span``)
        the time from the first start to the last end. CUDA: only pairs the GPU has passed."""
        with self._lock:
            done = [(s, e) for s, e in self.pending if not self.cuda or e.query()]
            self.pending = [pair for pair in self.pending if pair not in done]
        if not done:
            return
        if self.cuda:
            first = done[0][0]
            took = (max(first.elapsed_time(e) for _, e in done) if span
                    else sum(s.elapsed_time(e) for s, e in done)) / 1000.0
        else:
            took = (max(e for _, e in done) - min(s for s, _ in done)) if span else sum(e - s for s, e in done)
        self.mean_s = took if self.mean_s == 0 else (1 - _SMOOTHING) * self.mean_s + _SMOOTHING * took


class StepTimer:
    def __init__(self, device: torch.device, net: torch.nn.Module | None = None):
        cuda = device.type == "cuda"
        self._compute, self._comm = _Marks(cuda), _Marks(cuda)
        if isinstance(net, torch.nn.parallel.DistributedDataParallel):
            # Unannotated on purpose: DDP compares a hook's annotations with its own types, and
            # postponed annotations (strings) never match.
            def hook(state, bucket):  # type: ignore[no-untyped-def]
                return self._timed_allreduce(state, bucket)

            net.register_comm_hook(state=None, hook=hook)

    @property
    def mean_s(self) -> float:
        """Running mean of this rank's own compute per step (0: not measured yet)."""
        return self._compute.mean_s

    @property
    def comm_mean_s(self) -> float:
        """Running mean of this rank's gradient all-reduce per step, waiting included."""
        return self._comm.mean_s

    @contextmanager
    def section(self) -> Iterator[None]:
        start = self._compute.mark()
        yield
        self._compute.add(start, self._compute.mark())

    def step_done(self) -> None:
        """Fold this step's sections into the running means (CUDA: those the GPU finished)."""
        self._compute.fold(span=False)
        self._comm.fold(span=True)

    def _timed_allreduce(self, state: object, bucket: Any) -> torch.futures.Future[torch.Tensor]:
        """DDP's own all-reduce, timed. Its arithmetic exactly: scaled by 1 / world size, then
        summed (torch's allreduce_hook divides instead, which rounds differently unless the world
        size is a power of two)."""
        import torch.distributed as dist

        start = self._comm.mark()
        tensor = bucket.buffer()
        tensor.mul_(1.0 / dist.get_world_size())

        def reduced(future: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
            self._comm.add(start, self._comm.mark())  # CUDA: on the stream that waited for it
            return future.value()[0]

        return dist.all_reduce(tensor, async_op=True).get_future().then(reduced)  # type: ignore[union-attr]
