"""Training logs people read: TensorBoard scalars and sample grids, written by rank 0.

The trainer holds one ``TrainingLogs`` and makes four calls: ``open`` after resuming,
``step`` at each log line, ``maybe_sample`` after each step and ``close``. On other ranks every
call does nothing. Nothing here can stop a run: a sink that fails (bad directory, full disk)
logs one warning and switches itself off.

Where things go: the *run directory* (service.config.paths) is the parent of
``checkpoint.url`` when that is local (``runs/<run.name>/checkpoints`` -> ``runs/<run.name>``),
else ``runs/<run.name>`` under the working directory. Event files go to ``logging.tensorboard_dir`` (default ``<run dir>/tensorboard``),
grids to ``<run dir>/samples/step-NNNNNN.png``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.training_utils import EMAModel
from prometheus_client import CollectorRegistry

from service.config import Config
from service.config.paths import local_path, run_dir  # noqa: F401 (run_dir: re-exported)
from service.dist import DistInfo
from service.train.previews import SampleRenderer

log = logging.getLogger(__name__)

# Seconds between flushes of the event files: TensorBoard shows a live run this far behind.
FLUSH_S = 10


def tensorboard_dir(cfg: Config) -> Path:
    explicit = cfg.logging.tensorboard_dir
    if explicit is not None:
        local = local_path(explicit)
        assert local is not None  # LoggingConfig refuses anything else
        return Path(local)
    return run_dir(cfg) / "tensorboard"


def samples_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "samples"


class TensorBoardSink:
    """A SummaryWriter that never raises: the first failure is logged and ends the sink.

    Thread-safe (scalars come from the training thread, grids from the render thread)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._writer: Any = None
        self._lock = threading.Lock()
        self._done = False

    def open(self, purge_step: int | None) -> None:
        with self._lock:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.directory.mkdir(parents=True, exist_ok=True)
                # purge_step: a resumed run hides what an earlier start logged after the step
                # it resumed from (TensorBoard drops those events when it reads the directory).
                self._writer = SummaryWriter(str(self.directory), purge_step=purge_step, flush_secs=FLUSH_S)
            except Exception as e:  # noqa: BLE001 — logs must never stop training
                self._fail("open", e)
                return
        log.info("tensorboard: event files in %s (tensorboard --logdir %s)", self.directory, self.directory)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._write("scalars", lambda w: [w.add_scalar(tag, value, step) for tag, value in values.items()])

    def image(self, tag: str, png: Path, step: int) -> None:
        from PIL import Image

        def add(w: Any) -> None:
            with Image.open(png) as img:  # the PNG itself: TensorBoard shows what the file holds
                w.add_image(tag, np.asarray(img.convert("RGB")), step, dataformats="HWC")
            w.flush()

        self._write("image", add)

    def close(self) -> None:
        with self._lock:
            writer, self._writer, self._done = self._writer, None, True
            if writer is not None:
                try:
                    writer.close()
                except Exception as e:  # noqa: BLE001
                    log.warning("tensorboard: closing %s failed (%s: %s)", self.directory, type(e).__name__, e)

    def _write(self, what: str, call: Callable[[Any], Any]) -> None:
        with self._lock:
            if self._writer is None:
                return
            try:
                call(self._writer)
            except Exception as e:  # noqa: BLE001
                self._fail(what, e)

    def _fail(self, what: str, err: BaseException) -> None:
        """Called with the lock held."""
        writer, self._writer = self._writer, None
        if not self._done:
            self._done = True
            log.warning("tensorboard: writing %s to %s failed (%s: %s); no more TensorBoard logs this run",
                        what, self.directory, type(err).__name__, err)
        if writer is not None:
            try:
                writer.close()
            except Exception as e:  # noqa: BLE001 — already reported; the sink is off
                log.debug("tensorboard: closing after a failure: %s", e)


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
    """Rank 0's TensorBoard scalars and sample grids; on other ranks every call does nothing."""

    def __init__(self, cfg: Config, info: DistInfo, model: torch.nn.Module, ema: EMAModel,
                 registry: CollectorRegistry, should_stop: Callable[[], bool] = lambda: False):
        main = info.is_main
        self.tensorboard = TensorBoardSink(tensorboard_dir(cfg)) if main and cfg.logging.tensorboard else None
        self.samples = None
        if main and cfg.logging.sample_every > 0:
            self.samples = SampleRenderer(cfg, model, ema, samples_dir(cfg), info.device, on_grid=self._grid,
                                          should_stop=should_stop)
        self.checkpoint_times = CheckpointTimes(registry)
        self._last_step = 0

    def open(self, start_step: int) -> None:
        """After resuming: ``start_step`` is the step training continues from."""
        self._last_step = start_step
        if self.tensorboard is not None:
            # Only a resumed run hides what an earlier start logged past its step; a fresh one
            # (step 0) must not wipe another run's curves in a shared directory.
            self.tensorboard.open(purge_step=start_step + 1 if start_step > 0 else None)

    def step(self, step: int, loss: float, lr: float, samples_per_second: float,
             data_wait_share: float = 0.0) -> None:
        """At each log line: the training scalars, and the times of saves finished since."""
        self._last_step = step
        if self.tensorboard is None:
            return
        values = {"train/loss": loss, "train/lr": lr, "train/samples_per_second": samples_per_second,
                  "data/wait_share": data_wait_share}
        values.update(self._checkpoint_values())
        self.tensorboard.scalars(step, values)

    def maybe_sample(self, step: int, *, final: bool = False) -> None:
        """After each step: start a grid in the background if one is due. ``final``: the last
        step's grid, asked for after the final commit (it may wait for the previous render, and
        ``close`` waits for it; both waits end at a stop request)."""
        if self.samples is not None:
            self.samples.maybe_render(step, final=final)

    def close(self) -> None:
        """Wait for the last grid (bounded), log the final save's times, close the files."""
        if self.samples is not None:
            self.samples.close()
        if self.tensorboard is not None:
            values = self._checkpoint_values()
            if values:
                self.tensorboard.scalars(self._last_step, values)
            self.tensorboard.close()

    def _checkpoint_values(self) -> dict[str, float]:
        save, commit = self.checkpoint_times.poll()
        values = {}
        if save is not None:
            values["checkpoint/save_seconds"] = save
        if commit is not None:
            values["checkpoint/commit_seconds"] = commit
        return values

    def _grid(self, step: int, png: Path) -> None:
        if self.tensorboard is not None:
            self.tensorboard.image("samples/grid", png, step)
