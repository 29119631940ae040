"""Checking that every DDP replica holds the same weights and optimizer state.

Silent data corruption (a flipped bit in one GPU's memory) makes one replica differ from the
others without any error; DDP averages gradients, never weights, so the difference stays. The
check: each rank reduces every parameter and optimizer-state tensor to a checksum of its bits
(an integer sum over the tensor's 32-bit words: any single flipped bit changes it), the ranks
all-gather those vectors (8 bytes per tensor), and a rank whose vector differs from the
majority's holds a bad copy. With no majority (two ranks, or a split) every disagreeing rank is
named: the rollback then goes to a commit from before the last check that agreed.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.distributed as dist

from service.dist import DistInfo
from service.train.divergence import Divergence
from service.vocabulary import RollbackReason

log = logging.getLogger(__name__)


def bit_checksum(tensor: torch.Tensor) -> torch.Tensor:
    """An int64 sum of the tensor's bits, read as 32-bit words (bytes where it has an odd size)."""
    flat = tensor.detach().contiguous().view(-1)
    raw = flat.view(torch.uint8)
    words = raw.view(torch.int32) if raw.numel() % 4 == 0 else raw
    return words.sum(dtype=torch.int64)


def state_checksums(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """One checksum per parameter and per optimizer-state tensor, in a fixed order."""
    sums = [bit_checksum(p) for p in model.parameters()]
    for p in model.parameters():
        for value in optimizer.state.get(p, {}).values():
            if isinstance(value, torch.Tensor):
                sums.append(bit_checksum(value))
    return torch.stack(sums)


class ReplicaCheck:
    def __init__(self, info: DistInfo, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.info, self.model, self.optimizer = info, model, optimizer
        self.suspect_nodes: list[str] = []  # of the last failed check
        # Of the last failed check, and only where a majority agreed: the nodes known to hold
        # the bad copy (two replicas that disagree name no one).
        self.minority_nodes: list[str] = []

    def verify(self, step: int, last_verified: int) -> Divergence | None:
        """Every rank at the same step: None if all replicas agree, else the verdict."""
        if not dist.is_initialized() or self.info.world_size == 1:
            return None
        mine = state_checksums(self.model, self.optimizer)
        gathered = [torch.empty_like(mine) for _ in range(self.info.world_size)]
        dist.all_gather(gathered, mine)
        copies = [tuple(t.tolist()) for t in gathered]
        if len(set(copies)) == 1:
            return None
        nodes: list[str] = [""] * self.info.world_size
        dist.all_gather_object(nodes, self.info.node)
        (common, count), = Counter(copies).most_common(1)
        has_majority = count * 2 > len(copies)
        suspects = [r for r, c in enumerate(copies) if not has_majority or c != common]
        self.suspect_nodes = sorted({nodes[r] for r in suspects})
        self.minority_nodes = self.suspect_nodes if has_majority else []
        who = ", ".join(f"rank {r} (node {nodes[r]})" for r in suspects)
        detail = (f"{who} hold{'s' if len(suspects) == 1 else ''} a different copy of the weights or optimizer "
                  f"state than the majority" if has_majority else
                  f"{who} disagree and no majority can tell the bad copy")
        return Divergence(RollbackReason.REPLICA_MISMATCH, last_verified + 1, step, detail=detail)
