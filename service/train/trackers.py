"""Experiment trackers that rank 0 writes to (``logging.trackers``): TensorBoard, MLflow, W&B.

Each gets the same scalars (``scalars``) and sample grids (``image``). None of them can stop a
run: a tracker's first failure (bad directory, server gone, package missing) is logged once,
counted in ``ftdiff_train_tracker_failures_total{tracker}``, and switches that tracker off for the rest
of this start; the others go on.

One run of ours is one run of theirs across restarts: MLflow's is found again by the tag
``ftdiff.run_key`` and reopened, W&B's has that key as its id (``resume="allow"``). The key
is a digest of the checkpoint root and of its first start (``run_key``), so two runs never
share a tracker run, a fork gets its own, and so does a new run in an emptied root.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from service.config import Config
from service.config.paths import canonical_root, local_path, run_dir
from service.redact import redact_url

log = logging.getLogger(__name__)

# Seconds between flushes of TensorBoard's event files: it shows a live run this far behind.
FLUSH_S = 10
# Where the grids are plotted against their own step: they arrive from the render thread after
# later steps' scalars, and W&B drops values logged at a step below its newest.
GRID_STEP = "samples/step"


def run_key(cfg: Config) -> str:
    """Names this run in a tracker: the same for every start of it, another for any other run.

    A digest of where its checkpoints are (a local root by its absolute path, a remote one with
    its endpoint) and of when its first start claimed that root: a run started again in a
    root that was emptied (or reused after ``rm -rf``) is a new run, not more of the old one.
    Read after this start claimed its incarnation (the trackers open after resuming)."""
    from service.checkpoint.ownership import Ownership
    from service.checkpoint.storage import open_storage

    ck = cfg.checkpoint
    root = canonical_root(ck.url)
    if local_path(ck.url) is None:  # the same bucket path on two endpoints: two stores
        root = f"{redact_url(ck.endpoint_url or os.environ.get('AWS_ENDPOINT_URL') or '')}|{root}"
    records = Ownership(open_storage(ck.url, ck.endpoint_url, ck.region)).records()
    first = f"{records[0].time!r}" if records else ""
    return hashlib.sha256(f"{root}|{first}".encode()).hexdigest()[:16]


def tracker_params(cfg: Config) -> dict[str, Any]:
    """The config as flat ``section.key`` parameters, secrets redacted."""
    return {f"{section}.{key}": value for section, values in cfg.redacted_dict().items()
            for key, value in values.items()}


class Tracker:
    """One tracker, fed through a queue that its own thread drains: a slow or unreachable server
    (MLflow's client is synchronous HTTP with retries) never holds up a training step. It never
    raises. Subclasses implement ``_open``, ``_scalars``, ``_image`` and ``_close``, which run
    on that thread only."""

    name: ClassVar[str] = ""
    QUEUE = 1000  # calls waiting; beyond, new ones are dropped (said once)

    def __init__(self, on_failure: Callable[[str], None] = lambda name: None):
        self._on_failure = on_failure
        self._calls: queue.Queue[tuple[str, Callable[[], Any]] | None] = queue.Queue(self.QUEUE)
        self._thread: threading.Thread | None = None
        self.finished = True  # how the run ended, as close() was told
        self._off = False  # failed: the rest is dropped
        self._said_behind = False

    def open(self, start_step: int) -> None:
        """After resuming: ``start_step`` is the step training continues from (0: a fresh run)."""
        self._thread = threading.Thread(target=self._drain, name=f"ftdiff-{self.name}", daemon=True)
        self._thread.start()
        self._put("open", lambda: self._open(start_step))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._put("scalars", lambda: self._scalars(step, dict(values)))

    def image(self, tag: str, png: Path, step: int) -> None:
        self._put("image", lambda: self._image(tag, png, step))

    def close(self, wait_s: float = 60.0, finished: bool = True) -> None:
        """Send what is queued and close the tracker's run, waiting up to ``wait_s`` for it (the
        thread is a daemon: what is not sent by then is left behind with the process).
        ``finished``: the run ended normally (else it was stopped or failed; trackers with a
        run status say so)."""
        self.finished = finished
        thread, self._thread = self._thread, None
        if thread is None:
            return
        deadline = time.monotonic() + wait_s
        try:  # blocking: the close must not be the call dropped for a full queue
            self._calls.put(("close", self._close), timeout=wait_s)
            self._calls.put(None, timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            pass
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            log.warning("%s: still sending after %.0f s; leaving what is not sent (%s)",
                        self.name, wait_s, self.where)

    @property
    def where(self) -> str:
        """Where the tracker writes, for messages."""
        return ""

    def _put(self, what: str, call: Callable[[], Any]) -> None:
        if self._off or self._thread is None:
            return
        try:
            self._calls.put_nowait((what, call))
        except queue.Full:
            if not self._said_behind:
                self._said_behind = True
                log.warning("%s: %d calls behind (%s slow?); dropping new ones until it catches up",
                            self.name, self.QUEUE, self.where)

    def _drain(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            what, call = item
            if self._off:
                continue
            try:
                call()
            except Exception as e:  # noqa: BLE001 — trackers must never stop training
                self._fail(what, e)

    def _fail(self, what: str, err: BaseException) -> None:
        """Report once, count, switch off (the tracker's run is closed as far as it goes)."""
        self._off = True
        self._on_failure(self.name)
        log.warning("%s: %s failed for %s (%s: %s); no more %s logs this run",
                    self.name, what, self.where, type(err).__name__, err, self.name)
        if what != "close":
            try:
                self._close()
            except Exception as e:  # noqa: BLE001 — already reported; the tracker is off
                log.debug("%s: closing after a failure: %s", self.name, e)

    def _open(self, start_step: int) -> None:
        raise NotImplementedError

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def _image(self, tag: str, png: Path, step: int) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, directory: Path, on_failure: Callable[[str], None] = lambda name: None):
        super().__init__(on_failure)
        self.directory = directory
        self._writer: Any = None

    @property
    def where(self) -> str:
        return str(self.directory)

    def _open(self, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.directory.mkdir(parents=True, exist_ok=True)
        # purge_step: a resumed run hides what an earlier start logged after the step it
        # resumed from (TensorBoard drops those events when it reads the directory). A fresh
        # run (step 0) must not wipe another run's curves in a shared directory.
        purge = start_step + 1 if start_step > 0 else None
        self._writer = SummaryWriter(str(self.directory), purge_step=purge, flush_secs=FLUSH_S)
        log.info("tensorboard: event files in %s (tensorboard --logdir %s)", self.directory, self.directory)

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)

    def _image(self, tag: str, png: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(png) as img:  # the PNG itself: TensorBoard shows what the file holds
            self._writer.add_image(tag, np.asarray(img.convert("RGB")), step, dataformats="HWC")
        self._writer.flush()

    def _close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()


def mlflow_tracking_uri(cfg: Config) -> str:
    """logging.mlflow_tracking_uri, else $MLFLOW_TRACKING_URI, else a SQLite store in the run dir."""
    explicit = cfg.logging.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return explicit or f"sqlite:///{(run_dir(cfg) / 'mlflow.db').resolve()}"


class MLflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, cfg: Config, on_failure: Callable[[str], None] = lambda name: None):
        super().__init__(on_failure)
        self.uri = mlflow_tracking_uri(cfg)
        self.experiment = cfg.logging.mlflow_experiment
        self.run_name = cfg.run.name
        self.cfg = cfg
        self.key = ""  # run_key(cfg), read on the tracker's thread when it opens
        self.params = tracker_params(cfg)
        default_store = not (cfg.logging.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        # The default store keeps its artifacts (grids) beside it; a server decides its own.
        self.artifacts = (run_dir(cfg) / "mlflow-artifacts").resolve().as_uri() if default_store else None
        self._client: Any = None
        self._run_id: str | None = None

    @property
    def where(self) -> str:
        return redact_url(self.uri)

    def _open(self, start_step: int) -> None:
        from mlflow.tracking import MlflowClient

        self.key = run_key(self.cfg)
        client = MlflowClient(tracking_uri=self.uri)
        experiment = client.get_experiment_by_name(self.experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else client.create_experiment(self.experiment, artifact_location=self.artifacts))
        found = client.search_runs([experiment_id], filter_string=f"tags.`ftdiff.run_key` = '{self.key}'",
                                   max_results=1)
        if found:  # a restart or resume of the same run: its curves continue
            self._run_id = found[0].info.run_id
            client.update_run(self._run_id, status="RUNNING")
        else:
            run = client.create_run(experiment_id, run_name=self.run_name, tags={"ftdiff.run_key": self.key})
            self._run_id = run.info.run_id
            from mlflow.entities import Param

            params = [Param(k, str(v)[:6000]) for k, v in self.params.items()]  # MLflow's value limit
            for start in range(0, len(params), 100):  # its batch limit
                client.log_batch(self._run_id, params=params[start:start + 100])
        self._client = client
        log.info("mlflow: run %s in experiment %r at %s", self._run_id, self.experiment, self.where)

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self._run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def _image(self, tag: str, png: Path, step: int) -> None:
        # Under the tag's folder, named by step (the file is step-NNNNNN.png already).
        self._client.log_artifact(self._run_id, str(png), artifact_path=tag)

    def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._run_id is not None:  # a stopped start is KILLED until it resumes
            client.set_terminated(self._run_id, status="FINISHED" if self.finished else "KILLED")


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, cfg: Config, on_failure: Callable[[str], None] = lambda name: None):
        super().__init__(on_failure)
        self.project, self.entity = cfg.logging.wandb_project, cfg.logging.wandb_entity
        self.mode = cfg.logging.wandb_mode or os.environ.get("WANDB_MODE") or "online"
        self.run_name = cfg.run.name
        self.cfg = cfg
        self.key = ""  # run_key(cfg), read on the tracker's thread when it opens
        self.params = tracker_params(cfg)
        self.directory = run_dir(cfg).resolve()  # wandb/ goes in here
        self._run: Any = None

    @property
    def where(self) -> str:
        return f"project {self.project!r} ({self.mode}, {self.directory / 'wandb'})"

    def _open(self, start_step: int) -> None:
        import wandb

        self.key = run_key(self.cfg)
        self.directory.mkdir(parents=True, exist_ok=True)
        # console="off": W&B would otherwise capture this process's stdout and stderr; no
        # system-stats thread either (Prometheus has those).
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True)
        self._run = wandb.init(project=self.project, entity=self.entity, name=self.run_name, id=self.key,
                               resume="allow", dir=str(self.directory), mode=self.mode, config=self.params,
                               settings=settings, reinit="create_new")
        self._run.define_metric("samples/*", step_metric=GRID_STEP)
        log.info("wandb: run %s, %s", self.key, self.where)

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        self._run.log(dict(values), step=step)

    def _image(self, tag: str, png: Path, step: int) -> None:
        import wandb

        # commit=False: into the row of the newest step, which stays open for that step's
        # later values (the final save's times come after the last grid).
        self._run.log({tag: wandb.Image(str(png)), GRID_STEP: step}, commit=False)

    def _close(self) -> None:
        run, self._run = self._run, None
        if run is not None:
            run.finish()


def tensorboard_dir(cfg: Config) -> Path:
    explicit = cfg.logging.tensorboard_dir
    if explicit is not None:
        local = local_path(explicit)
        assert local is not None  # LoggingConfig refuses anything else
        return Path(local)
    return run_dir(cfg) / "tensorboard"


def make_trackers(cfg: Config, on_failure: Callable[[str], None]) -> list[Tracker]:
    """The trackers ``cfg`` asks for (not yet opened)."""
    trackers: list[Tracker] = []
    for name in cfg.logging.trackers:
        if name == "tensorboard" and cfg.logging.tensorboard:
            trackers.append(TensorBoardTracker(tensorboard_dir(cfg), on_failure))
        elif name == "mlflow":
            trackers.append(MLflowTracker(cfg, on_failure))
        elif name == "wandb":
            trackers.append(WandbTracker(cfg, on_failure))
    return trackers

