"""The trainer's defence against faults that do not crash: divergence and diverged replicas.

After every step, every rank judges the same global series (service.train.divergence) and, every
``divergence.replica_check_every`` steps, compares a fingerprint of its weights and optimizer
state with its peers' (service.train.replicas). A verdict rolls the job back in place: every
rank loads the newest good commit (Checkpointer.roll_back) and, after a spike or a run of
non-finite steps, the data from the first offending batch on plus ``divergence.skip_steps``
batches is skipped — a window of stream positions, the same at any world size, recorded in the
checkpoint (and its manifest) so that every later resume keeps it. Past
``divergence.max_rollbacks`` the job stops with exit 47 instead of training on garbage.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import torch

from service.checkpoint.manager import Checkpointer
from service.checkpoint.rollback import read_record
from service.config import Config
from service.data.skips import Skips
from service.dist import DistInfo
from service.errors import DivergedError
from service.metrics import WorkerMetrics
from service.train.divergence import Divergence, SpikeDetector
from service.train.replicas import ReplicaCheck
from service.train.state import DataState, TrainState
from service.vocabulary import RollbackReason

log = logging.getLogger(__name__)


class DivergenceGuard:
    def __init__(self, cfg: Config, info: DistInfo, checkpointer: Checkpointer, train_state: TrainState,
                 data_state: DataState, metrics: WorkerMetrics, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer):
        d = cfg.divergence
        self.cfg, self.checkpointer, self.metrics = cfg, checkpointer, metrics
        self.train_state, self.data_state = train_state, data_state
        self.detector = SpikeDetector(d.spike_factor, d.spike_steps, d.nonfinite_steps, d.history)
        self.replicas = ReplicaCheck(info, model, optimizer)
        metrics.train.replica_mismatches.labels(node=info.node)  # zero from the start
        # step -> where its batch began in the stream: where a skip window starts.
        self._batch_starts: deque[tuple[int, int]] = deque(maxlen=max(d.spike_steps, d.nonfinite_steps) + 2)
        self.last_verified = 0  # the newest step every rank was seen to hold the same state at
        self.suspect_nodes: set[str] = set()  # every node a replica check found in a minority
        checkpointer.notes = self.manifest_notes

    def started(self) -> None:
        """After resume: the configured windows join the recorded ones; the loaded state is
        the same on every rank (every rank loaded the same checkpoint, or the same seed)."""
        ck = self.checkpointer  # the record beside the commits may be newer than the commit loaded
        rollbacks, windows = ck.group.from_main(lambda: read_record(ck.catalog))
        self.train_state.rollbacks = max(self.train_state.rollbacks, rollbacks)
        self._skip(windows)
        # Commits were checked before they were taken; state left in the memory tier was not
        # (a rank left its own copy), so only the newest commit counts as verified.
        self.last_verified = self.checkpointer.last_committed_step or 0

    def manifest_notes(self) -> dict[str, Any]:
        return {"suspect_since": self.detector.judging_since, "skips": self.data_state.skips.as_lists()}

    def batch_began(self, step: int, position: int) -> None:
        self._batch_starts.append((step, position))

    def judge(self, step: int, loss: float, grad_norm: float | None) -> Divergence | None:
        """Every rank, after step ``step`` (same inputs everywhere, same verdict everywhere)."""
        judging = self.detector.judging_since
        verdict = self.detector.observe(step, loss, grad_norm)
        if judging is None and self.detector.judging_since is not None and verdict is None:
            log.warning("step %d: loss %.4g, gradient norm %s: above divergence.spike_factor x their recent level; "
                        "judging a possible spike (commits meanwhile are marked suspect)", step, loss,
                        "unknown" if grad_norm is None else f"{grad_norm:.4g}")
        every = self.cfg.divergence.replica_check_every
        # Also right before every commit: a commit then never holds a replica no check saw.
        commit_due = step % self.cfg.checkpoint.every_steps == 0 or step == self.cfg.train.max_steps
        if verdict is None and every and (step % every == 0 or commit_due):
            verdict = self.replicas.verify(step, self.last_verified)
            if verdict is None:
                self.last_verified = step
            else:
                for node in self.replicas.suspect_nodes:
                    self.metrics.train.replica_mismatches.labels(node=node).inc()

        return verdict

    def roll_back(self, verdict: Divergence) -> None:
        """Every rank: back to the newest good commit, past the offending data; DivergedError
        when the budget is spent or nothing good is left."""
        d, spent = self.cfg.divergence, self.train_state.rollbacks
        if spent >= d.max_rollbacks:
            raise DivergedError(
                f"training diverged: {verdict.describe()}; the rollback budget is spent "
                f"(divergence.max_rollbacks = {d.max_rollbacks}): stopping rather than training on. "
                "Lower train.lr or raise train.grad_clip, look at the data the manifest's skips name, or "
                "raise divergence.max_rollbacks")
        replica = verdict.reason is RollbackReason.REPLICA_MISMATCH
        at_most = self.last_verified if replica else verdict.first_step - 1
        window = None if replica else self._window(verdict)
        log.error("%s: rolling back to the newest good commit at or before step %d", verdict.describe(), at_most)
        windows = Skips(self.data_state.skips.windows + ([window] if window else [])).as_lists()
        target = self.checkpointer.roll_back(at_most, (spent + 1, windows))
        if target is None and replica:
            raise DivergedError(
                f"{verdict.describe()}, and no commit from before it is left to roll back to; nothing "
                "committed holds the bad copy: run the job again (a run without commits starts from its seed), "
                "and check the GPU memory of the node named")
        if target is None:
            raise DivergedError(
                f"training diverged: {verdict.describe()}, and no commit at or before step {at_most} is left "
                "to roll back to; lower train.lr, or resume from an earlier checkpoint with data.skip set")
        self.train_state.rollbacks = spent + 1
        self._skip(windows)  # the target's skips may lack windows added after it
        if window is not None:
            self.metrics.train.skipped_samples.inc(window[1] - window[0])
        self.detector.reset()
        self._batch_starts.clear()
        self.last_verified = target
        self.metrics.train.rollbacks.labels(reason=verdict.reason.value).inc()
        if replica:  # told the supervisor (heartbeats) only now: it may leave those nodes out,
            self.suspect_nodes.update(self.replicas.minority_nodes)  # which must not cut the rollback short
        log.error("rolled back to step %d (rollback %d of at most %d)%s", target, spent + 1, d.max_rollbacks,
                  f"; positions {window[0]}..{window[1] - 1} of the sample stream are skipped" if window else "")

    def _skip(self, windows: list[list[int]]) -> None:
        """``windows`` and the configured ones join the data state's; a position inside one moves
        past it."""
        skips = self.data_state.skips
        for start, end in [*windows, *self.cfg.data.skip]:
            skips.add(start, end)
        self.data_state.position = skips.next_start(self.data_state.position, self.cfg.train.global_batch_size)

    def _window(self, verdict: Divergence) -> tuple[int, int]:
        """[first offending batch's start, end of the verdict's batch + skip_steps batches)."""
        starts = dict(self._batch_starts)
        gb = self.cfg.train.global_batch_size
        first = starts.get(verdict.first_step, starts.get(verdict.last_step, self.data_state.position - gb))
        last = starts.get(verdict.last_step, self.data_state.position - gb)
        return first, last + gb * (1 + self.cfg.divergence.skip_steps)
