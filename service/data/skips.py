"""Windows of the global sample stream that are never trained on.

A rollback after a divergence skips the data that led there; an operator can skip data on
purpose (``data.skip``). Windows are ranges [start, end) of stream positions, so a skip means
the same samples at any world size or loader-worker count. A batch never overlaps one: a step
whose batch would overlap a window begins at its end (the positions before the window in that
batch are passed over too; a rollback's windows begin at a batch's start, so it never happens). The checkpoint records the windows
(a fixed-size tensor, so that DCP can load it in place), so that a later resume keeps them.
"""

from __future__ import annotations

import torch

MAX_WINDOWS = 64  # a run needing more rollbacks than this has a bigger problem
MAX_POSITION = 1 << 62  # fits the checkpoint's int64 table
_EMPTY = -1


class Skips:
    def __init__(self, windows: list[tuple[int, int]] | None = None):
        self.windows: list[tuple[int, int]] = []
        for start, end in windows or []:
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        """Skip [start, end) too (overlapping or touching windows merge)."""
        if not 0 <= start < end <= MAX_POSITION:
            raise ValueError(f"skip window [{start}, {end}) is empty, negative or too large")
        merged: list[tuple[int, int]] = []
        for a, b in sorted([*self.windows, (start, end)]):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self.windows = merged
        if len(self.windows) > MAX_WINDOWS:
            raise ValueError(f"more than {MAX_WINDOWS} skip windows")

    def next_start(self, position: int, batch: int) -> int:
        """Where a batch of ``batch`` positions that would begin at ``position`` begins."""
        for start, end in self.windows:  # sorted and disjoint: one pass
            if position < end and start < position + batch:
                position = end
        return position

    def skipped_between(self, begin: int, end: int) -> int:
        """Positions of [begin, end) inside windows."""
        return sum(max(0, min(end, b) - max(begin, a)) for a, b in self.windows)

    def as_lists(self) -> list[list[int]]:
        return [[a, b] for a, b in self.windows]

    def to_tensor(self) -> torch.Tensor:
        table = torch.full((MAX_WINDOWS, 2), _EMPTY, dtype=torch.int64)
        for i, (a, b) in enumerate(self.windows):
            table[i, 0], table[i, 1] = a, b
        return table

    @classmethod
    def from_tensor(cls, table: torch.Tensor) -> "Skips":
        return cls([(int(a), int(b)) for a, b in table.tolist() if a != _EMPTY])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Skips) and self.windows == other.windows

    def __repr__(self) -> str:
        return f"Skips({self.windows})"
