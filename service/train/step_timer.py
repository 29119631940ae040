"""How long this rank's own compute of a step takes — the straggler signal its heartbeats
carry (the supervisor compares ranks: ``ftdiff_rank_relative_speed``).

What is timed is the forward pass of each micro-batch: work with no collective in it (DDP's
buffer broadcast is off, see service/train/denoiser.py), so a rank waiting for a slow peer in
the gradient all-reduce does not look slow itself. On CUDA the time is read from events once
the GPU has passed them (never a synchronize in the step); elsewhere from the clock.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Weight of the newest step in the running mean (a few steps smooth out noise, a persistently
# slow rank shows within about ten).
_SMOOTHING = 0.3


class StepTimer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.mean_s = 0.0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._step_s = 0.0

    @contextmanager
    def section(self) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((start, end))
            return
        began = time.perf_counter()
        yield
        self._step_s += time.perf_counter() - began

    def step_done(self) -> None:
        """Fold this step's sections into the running mean (CUDA: those the GPU finished)."""
        if self.cuda:
            done = [pair for pair in self._pending if pair[1].query()]
            self._pending = [pair for pair in self._pending if pair not in done]
            self._step_s = sum(start.elapsed_time(end) for start, end in done) / 1000.0
            if not done:
                return
        self.mean_s = self._step_s if self.mean_s == 0 else (1 - _SMOOTHING) * self.mean_s + _SMOOTHING * self._step_s
        self._step_s = 0.0
