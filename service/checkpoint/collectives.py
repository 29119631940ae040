"""The checkpoint's collectives, on a dedicated gloo group, and the errors they carry.

All checkpoint collectives run on their own CPU group, so a background save never interleaves
with the training group's all-reduces. Decisions that must be the same everywhere (skip a
committed folder, which checkpoint to load) are made by rank 0 and broadcast — including rank
0's errors, so no rank is ever left waiting in a collective. Alone (no process group) every
collective degrades to a no-op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from service.checkpoint.errors import CorruptCheckpointError, FencedError
from service.dist import DistInfo, new_gloo_group
from service.errors import StorageError, UserError

# DCP raises CheckpointException (a BaseException!) when any rank failed; catch it with the rest.
CHECKPOINT_ERRORS = (Exception, CheckpointException)


class CheckpointGroup:
    """Collectives of the checkpoint group, degrading to no-ops when running alone."""

    def __init__(self, info: DistInfo):
        self.info = info
        self.pg = new_gloo_group(info.collective_timeout_s) if dist.is_initialized() else None

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` (rank 0's by default) on every rank."""
        if self.pg is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.pg)
        return box[0]

    def from_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only and give every rank its result — or its error, so that a
        storage failure on rank 0 fails every rank instead of leaving them in a collective."""
        outcome: tuple[str, Any] | None = None
        if self.info.is_main:
            try:
                outcome = ("ok", fn())
            except StorageError as e:  # keeps its exit code (3) and whether waiting can fix it
                outcome = ("storage", (str(e), e.permanent))
            except UserError as e:
                outcome = ("user", str(e))
            except FencedError as e:
                outcome = ("fenced", str(e))
            except CHECKPOINT_ERRORS as e:
                outcome = ("error", describe_error(e))
        outcome = self.broadcast(outcome)
        assert outcome is not None
        kind, value = outcome
        if kind == "storage":
            raise StorageError(value[0], permanent=value[1])
        if kind == "user":
            raise UserError(value)
        if kind == "fenced":
            raise FencedError(value)
        if kind == "error":
            raise RuntimeError(value)
        return value

    def gather_to_all(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.pg is None:
            return [obj]
        out: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(out, obj, group=self.pg)
        return out


def fenced_cause(err: BaseException) -> FencedError | None:
    """The FencedError behind ``err``, also when DCP wrapped it (per-rank failures)."""
    if isinstance(err, FencedError):
        return err
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict):
        for inner in failures.values():
            inner_err = inner[0] if isinstance(inner, tuple) else inner
            if isinstance(inner_err, BaseException) and fenced_cause(inner_err) is not None:
                return fenced_cause(inner_err)
    return None


def error_cause(err: BaseException) -> BaseException:
    """``err``, or the first rank's own error inside DCP's per-rank wrapper."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        return error_cause(inner[0] if isinstance(inner, tuple) else inner)
    return err


def describe_error(err: BaseException | None) -> str:
    """One line for a log or a message; DCP's per-rank wrapper is unwrapped to its cause."""
    if err is None:
        return "unknown error"
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, inner = next(iter(failures.items()))
        inner_err = inner[0] if isinstance(inner, tuple) else inner
        return f"rank {rank}: {describe_error(inner_err)}"
    if isinstance(err, CorruptCheckpointError):
        return str(err)
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"
