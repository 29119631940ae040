"""The global sample order of a sharded data set: exact and elastic, and read shard by shard.

Epoch ``e`` is the shards in a seeded order, their samples one after the other, shuffled
within consecutive windows of ``window`` samples (``data.shuffle_window``). Stream position
``p`` is sample ``p % N`` of epoch ``p // N``, as for every source (service/data/stream.py), so
a checkpoint still stores one integer and the order does not depend on the world size or the
loader workers. Consecutive positions stay inside one window, which spans at most
``window / shard size + 1`` shards: a node reads each shard whole, once per epoch, in order —
never one object per sample. The price of an order that is exact at any world size is that
every node reads every shard (its local ranks share one cached copy).
"""

from __future__ import annotations

import bisect
import functools
import itertools

import torch

from service.data.stream import derive_seed


def shard_starts(sizes: list[int]) -> list[int]:
    """The sample id of each shard's first sample (shards in index order)."""
    return list(itertools.accumulate(sizes[:-1], initial=0))


def shard_of(starts: list[int], sample: int) -> tuple[int, int]:
    """(shard, sample within it) of sample id ``sample``."""
    shard = bisect.bisect_right(starts, sample) - 1
    return shard, sample - starts[shard]


class ShardedOrder:
    """Maps a global stream position to (epoch, index in epoch, sample id); sample ids count
    the samples of the shards in index order."""

    def __init__(self, shard_sizes: list[int], seed: int, window: int):
        self.sizes, self.seed, self.window = list(shard_sizes), seed, max(1, window)
        self.starts = shard_starts(self.sizes)
        self.num_samples = sum(self.sizes)

    @functools.lru_cache(maxsize=4)
    def _epoch(self, epoch: int) -> tuple[list[int], list[int]]:
        """(the shards in this epoch's order, where each begins in the epoch's sequence)."""
        g = torch.Generator().manual_seed(derive_seed("shard-order", self.seed, epoch))
        shards = torch.randperm(len(self.sizes), generator=g).tolist()
        begins, at = [], 0
        for shard in shards:
            begins.append(at)
            at += self.sizes[shard]
        return shards, begins

    @functools.lru_cache(maxsize=64)
    def _window(self, epoch: int, k: int) -> list[int]:
        size = min(self.window, self.num_samples - k * self.window)
        g = torch.Generator().manual_seed(derive_seed("shuffle-window", self.seed, epoch, k))
        return torch.randperm(size, generator=g).tolist()

    def _sequence_item(self, epoch: int, i: int) -> tuple[int, int]:
        """(shard, sample within it) of item ``i`` of epoch ``epoch``'s shard sequence."""
        shards, begins = self._epoch(epoch)
        j = bisect.bisect_right(begins, i) - 1
        return shards[j], i - begins[j]

    def locate(self, position: int) -> tuple[int, int, int]:
        epoch, index = divmod(position, self.num_samples)
        k, offset = divmod(index, self.window)
        shard, member = self._sequence_item(epoch, k * self.window + self._window(epoch, k)[offset])
        return epoch, index, self.starts[shard] + member

    def shard_of(self, sample: int) -> tuple[int, int]:
        """(shard, sample within it) of sample id ``sample``."""
        return shard_of(self.starts, sample)

    def shards_ahead(self, position: int, count: int) -> list[int]:
        """The shards that positions ``[position, position + count)`` read, in the order they
        are first needed (what to prefetch)."""
        wanted: list[int] = []
        end = position + count
        while position < end:
            epoch, index = divmod(position, self.num_samples)
            k = index // self.window
            first = k * self.window
            last = min(first + self.window, self.num_samples) - 1  # the whole window: shuffled within
            shards, begins = self._epoch(epoch)
            for j in range(bisect.bisect_right(begins, first) - 1, bisect.bisect_right(begins, last)):
                if shards[j] not in wanted:
                    wanted.append(shards[j])
            position = epoch * self.num_samples + last + 1
        return wanted
