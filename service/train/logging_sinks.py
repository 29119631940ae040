"""Training logs people read: scalars and sample grids for the trackers (service.train.trackers:
TensorBoard, MLflow, W&B), written by rank 0.

The trainer holds one ``TrainingLogs`` and makes four calls: ``open`` after resuming,
``step`` at each log line, ``maybe_sample`` after each step and ``close``. On other ranks every
call does nothing. Nothing here can stop a run: a tracker that fails (bad directory, full disk,
server gone) logs one warning, is counted, and switches itself off.

Where things go: the *run directory* (service.config.paths) is the parent of
``checkpoint.url`` when that is local (``runs/<run.name>/checkpoints`` -> ``runs/<run.name>``),
else ``runs/<run.name>`` under the working directory. Event files go to ``logging.tensorboard_dir`` (default ``<run dir>/tensorboard``),
grids to ``<run dir>/samples/step-NNNNNN.png``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from prometheus_client import CollectorRegistry

from service.config import Config
from service.config.paths import run_dir  # noqa: F401 (run_dir: re-exported)
from service.dist import DistInfo
from service.metrics import WorkerMetrics
from service.train.previews import SampleRenderer
from service.train.trackers import make_trackers, tensorboard_dir  # noqa: F401 (re-exported)

# At the end of a run, what the trackers still have queued gets this long in all to be sent; at
# a stop signal or a failure this long (a slow tracker server must not delay a restart).
DRAIN_S = 60.0
STOP_DRAIN_S = 2.0


def samples_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "samples"


class CheckpointTimes:
    """Stall and commit times of the saves finished since the last poll, read back from the
    checkpointer's own histograms (ftdiff_checkpoint_save_duration_seconds{phase}) in the
    worker's registry, so they are the numbers Prometheus shows."""

    METRIC = "ftdiff_checkpoint_save_duration_seconds"

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self._seen = {"stall": (0.0, 0.0), "commit": (0.0, 0.0)}
        self._stall_unmatched = False

    def poll(self) -> tuple[float | None, float | None]:
        """(save_seconds, commit_seconds), each the mean of the new observations or None.

        Only async saves record a stall; a blocking save (checkpoint.async = false, the final
        one) holds training for its whole commit, so its commit time is its stall."""
        stall, commit = self._new("stall"), self._new("commit")
        save = stall
        if commit is not None and stall is None and not self._stall_unmatched:
            save = commit
        if stall is not None:
            self._stall_unmatched = True
        if commit is not None:
            # At most one save is in flight, so a commit closes the stall seen before it.
            self._stall_unmatched = False
        return save, commit

    def _new(self, phase: str) -> float | None:
        labels = {"phase": phase}
        count = self.registry.get_sample_value(f"{self.METRIC}_count", labels) or 0.0
        total = self.registry.get_sample_value(f"{self.METRIC}_sum", labels) or 0.0
        seen_count, seen_total = self._seen[phase]
        self._seen[phase] = (count, total)
        if count <= seen_count:
            return None
        return (total - seen_total) / (count - seen_count)


class TrainingLogs:
    """Rank 0's scalars and sample grids, to every tracker; on other ranks every call does nothing."""

    def __init__(self, cfg: Config, info: DistInfo, model: torch.nn.Module, ema: EMAModel,
                 metrics: WorkerMetrics, should_stop: Callable[[], bool] = lambda: False):
        main = info.is_main
        failures = metrics.train.tracker_failures
        self.trackers = make_trackers(cfg, lambda name: failures.labels(tracker=name).inc()) if main else []
        self.samples = None
        if main and cfg.logging.sample_every > 0:
            self.samples = SampleRenderer(cfg, model, ema, samples_dir(cfg), info.device, on_grid=self._grid,
                                          should_stop=should_stop)
        self.checkpoint_times = CheckpointTimes(metrics.registry)
        self._last_step = 0

    def open(self, start_step: int) -> None:
        """After resuming: ``start_step`` is the step training continues from."""
        self._last_step = start_step
        for tracker in self.trackers:
            tracker.open(start_step)

    def step(self, step: int, loss: float, lr: float, samples_per_second: float,
             data_wait_share: float = 0.0) -> None:
        """At each log line: the training scalars, and the times of saves finished since."""
        self._last_step = step
        if not self.trackers:
            return
        values = {"train/loss": loss, "train/lr": lr, "train/samples_per_second": samples_per_second,
                  "data/wait_share": data_wait_share}
        values.update(self._checkpoint_values())
        for tracker in self.trackers:
            tracker.scalars(step, values)

    def maybe_sample(self, step: int, *, final: bool = False) -> None:
        """After each step: start a grid in the background if one is due. ``final``: the last
        step's grid, asked for after the final commit (it may wait for the previous render, and
        ``close`` waits for it; both waits end at a stop request)."""
        if self.samples is not None:
            self.samples.maybe_render(step, final=final)

    def close(self, drain: bool = True) -> None:
        """Wait for the last grid (bounded), log the final save's times, close the trackers.

        ``drain``: the run ended normally, so the trackers get up to ``DRAIN_S`` in all to send
        what is queued; on a stop signal or a failure they get ``STOP_DRAIN_S`` (the emergency
        checkpoint, not the curves, must fit in the grace period, and a restart must not wait)."""
        if self.samples is not None:
            self.samples.close()
        values = self._checkpoint_values() if self.trackers else {}
        deadline = time.monotonic() + (DRAIN_S if drain else STOP_DRAIN_S)
        for tracker in self.trackers:
            if values:
                tracker.scalars(self._last_step, values)
            tracker.close(wait_s=max(0.0, deadline - time.monotonic()), finished=drain)

    def _checkpoint_values(self) -> dict[str, float]:
        save, commit = self.checkpoint_times.poll()
        values = {}
        if save is not None:
            values["checkpoint/save_seconds"] = save
        if commit is not None:
            values["checkpoint/commit_seconds"] = commit
        return values

    def _grid(self, step: int, png: Path) -> None:
        for tracker in self.trackers:
            tracker.image("samples/grid", png, step)
