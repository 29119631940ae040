"""Every fault-injection hook, in one place: for tests and benchmarks, never needed in production.

Inside the job, product code calls exactly two narrow points, both inert unless their
documented environment variable is set:

- ``crash_point(stage, step)`` in the checkpoint commit protocol: ``FTDIFF_CRASH_AT=<stage>:<step>``
  SIGKILLs the process at that moment (stages: ``after_shards``, ``after_metadata``, ``after_manifest``, ``after_pointer``), so tests crash for real at
  exact points of the protocol; ``FTDIFF_PAUSE_AT=<stage>:<step>`` SIGSTOPs it there instead.
- ``StepProbe.after_step(...)`` in the training loop: ``FTDIFF_SAMPLE_TRACE=<dir>`` appends one
  JSON line per optimizer step to ``<dir>/rank<R>-pid<PID>.jsonl`` (the audit trail that proves
  exactly-once consumption), and ``FTDIFF_FAIL_AT_STEP=<step>`` raises in every attempt that
  reaches that step (a deterministic crash loop with a real traceback).
- ``StepProbe.loss(step, loss)`` on each rank's loss: ``FTDIFF_NAN_AT_STEP=S[:RANK]`` makes that
  rank's loss (every rank's without ``:RANK``) NaN at step S, once per run (a marker file,
  keyed by torchrun's run id, in the sample trace folder or else the temp folder, survives the
  restarts of that run);
  ``FTDIFF_SPIKE_AT_STEP=S:FACTOR`` scales the loss of steps S..S+2 by FACTOR on every rank,
  once per run (a replay of those step numbers after a rollback is clean);
  ``StepProbe.slow_rank()`` in each micro-batch's forward: ``FTDIFF_SLOW_RANK=RANK:SECONDS``
  makes that rank sleep that long per step (a straggler).
- ``StepProbe.corrupt(step, model)`` after each optimizer step: ``FTDIFF_CORRUPT_PARAM_AT_STEP=S:RANK``
  flips one bit of one parameter on that rank after step S, once per run (silent data
  corruption: the replicas disagree from then on).

From outside, faults go through the real mechanism (a signal to a pid), so the detection code
under test is the code that runs in production: ``kill9``, ``freeze``, ``thaw``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

def crash_point(stage: str, step: int) -> None:
    """SIGKILL this process if ``FTDIFF_CRASH_AT`` names this stage of this step's commit;
    SIGSTOP it (a process that stalls there and may wake up much later: a zombie writer) if
    ``FTDIFF_PAUSE_AT`` does."""
    here = f"{stage}:{step}"
    if os.environ.get("FTDIFF_CRASH_AT") == here:
        log.warning("FTDIFF_CRASH_AT: killing this process at %s of step %d", stage, step)
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("FTDIFF_PAUSE_AT") == here:
        log.warning("FTDIFF_PAUSE_AT: stopping this process at %s of step %d", stage, step)
        os.kill(os.getpid(), signal.SIGSTOP)


class StepProbe:
    """The training loop's per-step hook: sample trace and injected failure, from the env."""

    def __init__(self, rank: int, world_size: int, env: Mapping[str, str] = os.environ, node: str = ""):
        self.rank, self.world_size, self.node = rank, world_size, node
        trace_dir = env.get("FTDIFF_SAMPLE_TRACE")
        self.trace = Path(trace_dir) / f"rank{rank}-pid{os.getpid()}.jsonl" if trace_dir else None
        fail_at = env.get("FTDIFF_FAIL_AT_STEP")
        self.fail_at = int(fail_at) if fail_at else None
        self.nan_at: tuple[int, int | None] | None = None
        nan_at = env.get("FTDIFF_NAN_AT_STEP")
        if nan_at:
            step, _, rank = nan_at.partition(":")
            self.nan_at = (int(step), int(rank) if rank else None)
        spike = env.get("FTDIFF_SPIKE_AT_STEP")
        spike_step, _, factor = (spike or "").partition(":")
        self.spike_at = (int(spike_step), float(factor)) if spike else None
        self._spiked: set[int] = set()
        corrupt = env.get("FTDIFF_CORRUPT_PARAM_AT_STEP")
        corrupt_step, _, corrupt_rank = (corrupt or "").partition(":")
        self.corrupt_at = int(corrupt_step) if corrupt and int(corrupt_rank) == rank else None
        slow = env.get("FTDIFF_SLOW_RANK")
        slow_rank, _, seconds = (slow or "").partition(":")
        self.slow_s = float(seconds) if slow and int(slow_rank) == rank else 0.0
        # "Once per run": a marker beside the run's sample trace when there is one (a fresh
        # folder per test), else under the temp folder; keyed by torchrun's run id either way.
        where = Path(trace_dir) if trace_dir else Path(tempfile.gettempdir())
        self._once = where / f"ftdiff-fault-{env.get('TORCHELASTIC_RUN_ID', os.getppid())}"

    def slow_rank(self) -> None:
        """Sleep where ``FTDIFF_SLOW_RANK`` names this rank (a slow GPU or node)."""
        if self.slow_s:
            time.sleep(self.slow_s)

    def _first_time(self, what: str) -> bool:
        """Whether ``what`` happens for the first time in this run (and mark it as happened)."""
        try:
            self._once.with_name(f"{self._once.name}-{what}-rank{self.rank}").touch(exist_ok=False)
            return True
        except FileExistsError:
            return False  # injected once in this run already (before a restart)

    def loss(self, step: int, loss: Any) -> Any:
        """``loss``, or NaN where ``FTDIFF_NAN_AT_STEP`` says so, or scaled where
        ``FTDIFF_SPIKE_AT_STEP`` does (once per run each)."""
        if self.spike_at is not None:
            first, factor = self.spike_at
            spiking = first in self._spiked or (step == first and self._first_time(f"spike-{first}"))
            if spiking and first <= step <= first + 2 and step not in self._spiked:
                self._spiked.add(step)
                log.warning("FTDIFF_SPIKE_AT_STEP: the loss of step %d is scaled by %g", step, factor)
                return loss * factor
        if self.nan_at is None or self.nan_at[0] != step or self.nan_at[1] not in (None, self.rank):
            return loss
        if not self._first_time(f"nan-{step}"):
            return loss
        log.warning("FTDIFF_NAN_AT_STEP: the loss of step %d is NaN on rank %d", step, self.rank)
        return loss * float("nan")

    def corrupt(self, step: int, model: Any) -> None:
        """Flip one bit of one parameter where ``FTDIFF_CORRUPT_PARAM_AT_STEP`` says so (once)."""
        if self.corrupt_at != step or not self._first_time(f"corrupt-{step}"):
            return
        import torch

        param = next(p for p in model.parameters() if p.dtype == torch.float32)
        with torch.no_grad():
            param.view(-1)[:1].view(torch.int32).bitwise_xor_(1 << 22)  # a mantissa bit of one weight
        log.warning("FTDIFF_CORRUPT_PARAM_AT_STEP: flipped a bit of a weight on rank %d after step %d",
                    self.rank, step)

    def after_step(self, step: int, positions: Any) -> None:
        """``positions``: the batch's global sample positions (a tensor or a sequence)."""
        if self.trace is not None:
            listed = positions.tolist() if hasattr(positions, "tolist") else list(positions)
            line = {"step": step, "rank": self.rank, "time": time.time(),
                    "world_size": self.world_size, "positions": listed,
                    "pid": os.getpid(), "node": self.node}
            with self.trace.open("a") as f:
                f.write(json.dumps(line) + "\n")
        if self.fail_at == step:
            raise RuntimeError(f"injected failure at step {step} (FTDIFF_FAIL_AT_STEP)")


def kill9(pid: int) -> None:
    """A crash: the process disappears without any chance to clean up."""
    os.kill(pid, signal.SIGKILL)


def freeze(pid: int) -> None:
    """A hang: the process stays alive but stops running (heartbeats included)."""
    os.kill(pid, signal.SIGSTOP)


def thaw(pid: int) -> None:
    """The end of a hang: a frozen process runs again (a zombie writer wakes up)."""
    os.kill(pid, signal.SIGCONT)
