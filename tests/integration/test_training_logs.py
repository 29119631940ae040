"""Real (in-process, one rank, CPU) training runs with [logging]: TensorBoard events read back
with TensorBoard's own reader, sample grids on disk, and the weights unchanged by rendering."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY, assert_bitwise_equal, weights

STEPS = 8
SAMPLE_N = 4
# Async saves every 2 steps and a grid every 2 steps: renders overlap training and saves.
RUN = [f"train.max_steps={STEPS}", "checkpoint.every_steps=2", f"logging.sample_n={SAMPLE_N}",
       "logging.sample_steps=5", "logging.tensorboard=true"]
SCALARS = {"train/loss", "train/lr", "train/samples_per_second", "checkpoint/save_seconds",
           "checkpoint/commit_seconds"}


def train(run_dir: Path, overrides: list[str]) -> str:
    """Train to STEPS in this process; returns the checkpoint URL (run_dir/checkpoints)."""
    from service.config import load_config
    from service.dist import DistInfo
    from service.train.loop import Trainer

    url = str(run_dir / "checkpoints")
    cfg = load_config(None, TINY + RUN + [f'checkpoint.url="{url}"', *overrides])
    trainer = Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu"), "0"))
    try:
        assert trainer.run() == 0
    finally:
        trainer.close()
    return url


def event_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("events.out.tfevents.*")) if directory.exists() else []


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("logged") / "run"
    train(run_dir, ["logging.sample_every=2"])
    return run_dir


@pytest.mark.timeout(120)
def test_tensorboard_events_hold_the_scalars_and_the_sample_grids(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator
    from tensorboard.backend.event_processing.event_accumulator import SCALARS as KEEP

    assert event_files(logged_run / "tensorboard")  # <run dir>/tensorboard, beside checkpoints/
    events = EventAccumulator(str(logged_run / "tensorboard"), size_guidance={IMAGES: 0, KEEP: 0})
    events.Reload()
    tags = events.Tags()
    assert SCALARS <= set(tags["scalars"]), tags["scalars"]
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, STEPS + 1))  # log_every=1
    assert all(math.isfinite(e.value) and e.value > 0 for e in events.Scalars("train/loss"))
    assert all(e.value >= 0 for e in events.Scalars("checkpoint/commit_seconds"))
    assert "samples/grid" in tags["images"]
    steps = [e.step for e in events.Images("samples/grid")]
    # The first grid is never skipped, and the last step's is always rendered (waited for).
    assert steps[0] == 2 and steps[-1] == STEPS, steps


@pytest.mark.timeout(120)
def test_sample_grids_are_pngs_of_the_expected_size(logged_run):
    from PIL import Image

    from service.models.unet import PRESETS

    pngs = sorted(p.name for p in (logged_run / "samples").glob("*.png"))
    assert {"step-000002.png", f"step-{STEPS:06d}.png"} <= set(pngs), pngs
    side = PRESETS["tiny"].sample_size
    cols = math.ceil(math.sqrt(SAMPLE_N))
    rows = math.ceil(SAMPLE_N / cols)
    for name in pngs:
        with Image.open(logged_run / "samples" / name) as img:
            img.verify()  # a complete, valid PNG
        with Image.open(logged_run / "samples" / name) as img:
            assert img.format == "PNG" and img.mode == "RGB"
            # save_grid: 1-pixel borders, upscaled 4x
            assert img.size == ((cols * (side + 1) + 1) * 4, (rows * (side + 1) + 1) * 4)


@pytest.mark.timeout(120)
def test_tensorboard_off_writes_no_event_file_but_still_writes_grids(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, ["logging.tensorboard=false", "logging.sample_every=4"])
    assert event_files(tmp_path) == []
    assert (run_dir / "samples" / f"step-{STEPS:06d}.png").is_file()


@pytest.mark.timeout(120)
def test_rendering_does_not_change_the_weights(logged_run, tmp_path):
    # The logged run really rendered while it trained (else this would prove nothing) ...
    assert len(list((logged_run / "samples").glob("*.png"))) >= 2
    # ... and ends bitwise where a run that logs nothing at all ends.
    quiet = train(tmp_path / "run", ["logging.tensorboard=false", "logging.sample_every=0"])
    assert not (tmp_path / "run" / "samples").exists()
    loud = str(logged_run / "checkpoints")
    assert_bitwise_equal(weights(loud, "model"), weights(quiet, "model"))
    assert_bitwise_equal(weights(loud, "ema"), weights(quiet, "ema"))
