"""logging.trackers for real: an in-process training run (one rank, CPU) that logs to
TensorBoard, to MLflow's own local store (SQLite, read back with MLflow's client) and to W&B in
offline mode (its run files read back), then resumes; and a tracker that cannot start, which
training outlives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import TINY
from tests.wandb_records import history

pytestmark = pytest.mark.timeout(240)

RUN = ["checkpoint.every_steps=4", "logging.sample_every=4", "logging.sample_n=4", "logging.sample_steps=5",
       "logging.tensorboard=true", 'logging.wandb_mode="offline"']
ALL = 'logging.trackers=["tensorboard", "mlflow", "wandb"]'


@pytest.fixture(autouse=True)
def _wandb_at_home(tmp_path, monkeypatch):
    # W&B's settings and caches go under the test's folder, not this machine's home.
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)


def train(run_dir: Path, steps: int, overrides: list[str]):  # type: ignore[no-untyped-def]
    """Train to ``steps`` in this process; returns the trainer (closed)."""
    from service.config import load_config
    from service.dist import DistInfo
    from service.train.loop import Trainer

    cfg = load_config(None, TINY + RUN + [f"train.max_steps={steps}", f'checkpoint.url="{run_dir}/checkpoints"',
                                          *overrides])
    trainer = Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu"), "0"))
    try:
        assert trainer.run() == 0
    finally:
        trainer.close()
    return trainer


def test_mlflow_and_wandb_get_the_scalars_and_grids_of_every_start_of_one_run(tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    first = train(run_dir, 8, [ALL])
    assert first.phase == "done"
    trainer = train(run_dir, 12, [ALL])  # a restart of the same run: the same tracker runs go on
    assert trainer.metrics.registry.get_sample_value("ftdiff_train_tracker_failures_total", {"tracker": "mlflow"}) is None

    # MLflow: one run, found by its key, with both starts' steps, the config and the grids.
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ftdiff")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "ftdiff"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(1, 13))
    assert client.get_metric_history(run.info.run_id, "checkpoint/commit_seconds")
    assert run.data.params["train.lr"] == str(trainer.cfg.train.lr)
    grids = sorted(Path(a.path).name for a in client.list_artifacts(run.info.run_id, "samples/grid"))
    assert grids == ["step-000004.png", "step-000008.png", "step-000012.png"]
    assert (run_dir / "mlflow-artifacts").is_dir()  # the default store keeps its artifacts in the run dir

    # W&B offline: one run id for both starts (W&B merges them on `wandb sync`).
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and len({f.name for f in files}) == 1
    rows = [row for f in files for row in history(f)]
    assert sorted(row["_step"] for row in rows if "train/loss" in row) == list(range(1, 13))
    grid_steps = sorted(row["samples/step"] for row in rows if "samples/grid/_type" in row)
    assert grid_steps == [4, 8, 12]
    assert all(row.get("samples/grid/_type") == "image-file" for row in rows if "samples/step" in row)


def test_a_tracker_that_cannot_start_is_counted_and_training_goes_on(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    run_dir = tmp_path / "run"
    trainer = train(run_dir, 6, ['logging.trackers=["mlflow", "tensorboard"]',
                                 f'logging.mlflow_tracking_uri="sqlite:///{blocker}/mlflow.db"'])
    failures = trainer.metrics.registry.get_sample_value("ftdiff_train_tracker_failures_total", {"tracker": "mlflow"})
    assert failures == 1
    from service.checkpoint.catalog import Catalog
    from service.checkpoint.storage import open_storage

    assert Catalog(open_storage(str(run_dir / "checkpoints"))).latest()[0] == 6  # trained to the end
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={SCALARS: 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 7))  # the other tracker went on


def test_a_stopped_start_leaves_its_mlflow_run_killed_until_the_run_finishes(tmp_path):
    from mlflow.tracking import MlflowClient

    from service.checkpoint.ownership import Ownership
    from service.checkpoint.storage import open_storage
    from service.config import load_config
    from service.train.trackers import MLflowTracker

    cfg = load_config(None, [f'checkpoint.url="{tmp_path}/run/checkpoints"'])
    Ownership(open_storage(cfg.checkpoint.url)).claim("start-1")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    for finished, status in ((False, "KILLED"), (True, "FINISHED")):
        tracker = MLflowTracker(cfg)
        tracker.open(0)
        tracker.scalars(1, {"train/loss": 1.0})
        tracker.close(wait_s=30, finished=finished)
        runs = client.search_runs([client.get_experiment_by_name("ftdiff").experiment_id])
        assert [r.info.status for r in runs] == [status]
