"""Loading checkpoints written before a state entry existed.

DCP refuses to load a state dict with a key the checkpoint lacks, and accepts anything once
told to allow partial loads. Neither fits a format that grows: a checkpoint from an earlier
release lacks the entries added since (they keep their fresh values: no skip windows, no
rollbacks so far), while any other missing key means the checkpoint is not what this run
needs (a weight, a moment) and must fail the load, as it always did.
"""

from __future__ import annotations

from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import LoadPlan

from service.state_keys import DATA, TRAIN_STATE

# Flattened state keys (``<registry key>.<entry>``) added after checkpoints were first written.
ADDED_LATER = frozenset({f"{DATA}.skips", f"{TRAIN_STATE}.rollbacks"})


class MissingStateError(RuntimeError):
    """The checkpoint lacks state this run needs."""


class GrowingFormatLoadPlanner(DefaultLoadPlanner):
    def __init__(self) -> None:
        super().__init__(allow_partial_load=True)

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        stored = self.metadata.state_dict_metadata
        missing = sorted(k for k in self.state_dict if k not in stored and k not in ADDED_LATER)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise MissingStateError(f"the checkpoint has no {shown}")
        return super().create_local_plan()
