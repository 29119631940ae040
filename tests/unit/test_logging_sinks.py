"""[logging]: where TensorBoard and sample grids go, the config rules, and the sinks' failure modes."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path

import pytest
import torch

from service.config import Config, load_config
from service.errors import UserError
from service.train.logging_sinks import CheckpointTimes, run_dir, samples_dir, tensorboard_dir
from service.train.trackers import TensorBoardTracker, Tracker


@pytest.mark.timeout(10)
@pytest.mark.parametrize("overrides,expected", [
    ([], "runs/ftdiff/tensorboard"),  # the default checkpoint.url is runs/ftdiff/checkpoints
    (['checkpoint.url="runs/exp/checkpoints/"'], "runs/exp/tensorboard"),
    (['checkpoint.url="/data/exp/ckpt"'], "/data/exp/tensorboard"),
    (['checkpoint.url="file:///data/exp/ckpt"'], "/data/exp/tensorboard"),
    # Remote checkpoints: a local directory named after the run.
    (['checkpoint.url="s3://bucket/exp"', 'run.name="exp-7"'], "runs/exp-7/tensorboard"),
    (['checkpoint.url="memory://exp"'], "runs/ftdiff/tensorboard"),
    (['checkpoint.url="s3://bucket/exp"', 'logging.tensorboard_dir="/tb/exp"'], "/tb/exp"),
    (['logging.tensorboard_dir="file:///tb/exp"'], "/tb/exp"),
])
def test_tensorboard_dir_resolution(overrides, expected):
    assert tensorboard_dir(load_config(None, overrides)) == Path(expected)


@pytest.mark.timeout(10)
def test_samples_go_to_the_run_directory_even_when_tensorboard_is_elsewhere():
    cfg = load_config(None, ['checkpoint.url="/data/exp/ckpt"', 'logging.tensorboard_dir="/tb"'])
    assert run_dir(cfg) == Path("/data/exp")
    assert samples_dir(cfg) == Path("/data/exp/samples")


@pytest.mark.timeout(10)
def test_remote_tensorboard_dir_is_a_config_error_naming_the_key_without_the_secret():
    with pytest.raises(UserError) as e:
        load_config(None, ['logging.tensorboard_dir="s3://AKIA:hunter2@bucket/tb"'])
    msg = str(e.value)
    assert "logging.tensorboard_dir" in msg and "local" in msg
    assert "hunter2" not in msg


@pytest.mark.timeout(10)
@pytest.mark.parametrize("item,needle", [
    ("logging.sample_every=-1", "logging.sample_every"),
    ("logging.sample_n=0", "logging.sample_n"),
    ('logging.tensorboard="yes"', "logging.tensorboard"),
    ("logging.sample_stepz=5", "sample_steps"),  # unknown key: the allowed ones are listed
])
def test_bad_logging_values_name_the_key(item, needle):
    with pytest.raises(UserError, match=needle):
        load_config(None, [item])


@pytest.mark.timeout(10)
def test_logging_defaults_keep_the_config_hash_and_are_not_math():
    from service.checkpoint.identity import MATH_KEYS, fingerprint

    cfg = load_config(None, ["run.seed=5"])
    # The hash of the release before [logging] existed: the same keys, without the section.
    from service.config.hashing import _DEFAULT_CHANGED, _HASHED_FROM_THE_START

    old_body = {section: {key: value for key, value in values.items()
                          if key in _HASHED_FROM_THE_START.get(section, ()) and (section, key) not in _DEFAULT_CHANGED}
                for section, values in cfg.to_dict().items() if section in _HASHED_FROM_THE_START}
    assert cfg.hash() == hashlib.sha256(json.dumps(old_body, sort_keys=True).encode()).hexdigest()[:16]
    # A changed logging setting is a changed setting ...
    assert load_config(None, ["run.seed=5", "logging.sample_every=0"]).hash() != cfg.hash()
    # ... but never part of the run's math: resuming with other logging settings is allowed.
    assert "logging" not in MATH_KEYS
    other = load_config(None, ["run.seed=5", "logging.tensorboard=false", "logging.sample_n=4"])
    assert fingerprint(other) == fingerprint(cfg)
    assert "logging" in Config().redacted_dict()


@pytest.mark.timeout(20)
def test_tensorboard_on_a_bad_directory_warns_once_counts_once_and_never_raises(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    failed: list[str] = []
    tracker = TensorBoardTracker(blocker / "tb", on_failure=failed.append)
    with caplog.at_level(logging.WARNING, logger="service.train.trackers"):
        tracker.open(start_step=1)
        for step in range(3):
            tracker.scalars(step, {"train/loss": 1.0})
        tracker.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no more tensorboard logs" in warnings[0].getMessage()
    assert failed == ["tensorboard"]


class _Recording(Tracker):
    """A tracker whose server answers slowly, then fails on its third batch of scalars."""
    name = "recording"

    def __init__(self, on_failure, delay_s: float = 0.0, fail_at: int | None = None):  # type: ignore[no-untyped-def]
        super().__init__(on_failure)
        self.delay_s, self.fail_at = delay_s, fail_at
        self.got: list[int] = []
        self.closed = False

    def _open(self, start_step: int) -> None:
        pass

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        threading.Event().wait(self.delay_s)
        if step == self.fail_at:
            raise ConnectionError("server went away")
        self.got.append(step)

    def _image(self, tag: str, png: Path, step: int) -> None:
        pass

    def _close(self) -> None:
        self.closed = True


@pytest.mark.timeout(20)
def test_a_slow_tracker_never_holds_up_the_caller_and_gets_everything_by_close():
    import time

    tracker = _Recording(lambda name: None, delay_s=0.05)
    tracker.open(0)
    started = time.monotonic()
    for step in range(1, 21):
        tracker.scalars(step, {"train/loss": 1.0})
    assert time.monotonic() - started < 0.5  # 20 x 50 ms of "server" time went to the tracker's thread
    tracker.close()
    assert tracker.got == list(range(1, 21)) and tracker.closed


@pytest.mark.timeout(20)
def test_a_tracker_that_fails_mid_run_is_counted_once_and_drops_the_rest(caplog):
    failed: list[str] = []
    tracker = _Recording(failed.append, fail_at=3)
    with caplog.at_level(logging.WARNING, logger="service.train.trackers"):
        tracker.open(0)
        for step in range(1, 8):
            tracker.scalars(step, {"train/loss": 1.0})
        tracker.close()
    assert tracker.got == [1, 2] and tracker.closed
    assert failed == ["recording"]
    assert len([r for r in caplog.records if "server went away" in r.getMessage()]) == 1


@pytest.mark.timeout(10)
def test_trackers_config_names_each_once_and_needs_the_client_installed(monkeypatch):
    import importlib.util

    assert load_config(None).logging.trackers == ["tensorboard"]
    with pytest.raises(UserError, match="twice"):
        load_config(None, ['logging.trackers=["wandb", "wandb"]'])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install 'ftdiff\[mlflow\]'"):
        load_config(None, ['logging.trackers=["tensorboard", "mlflow"]'])


@pytest.mark.timeout(10)
def test_checkpoint_times_pairs_stalls_with_commits():
    from prometheus_client import CollectorRegistry

    from service.metrics import CheckpointMetrics

    registry = CollectorRegistry()
    hist = CheckpointMetrics(registry).save_duration
    times = CheckpointTimes(registry)
    assert times.poll() == (None, None)
    hist.labels(phase="stall").observe(0.5)  # an async save: the stall first ...
    assert times.poll() == (0.5, None)
    hist.labels(phase="commit").observe(3.0)  # ... its commit later, not taken for a stall
    assert times.poll() == (None, 3.0)
    hist.labels(phase="commit").observe(2.0)  # a blocking save: training waited for the commit
    assert times.poll() == (2.0, 2.0)
    hist.labels(phase="stall").observe(0.25)  # both seen in one poll
    hist.labels(phase="commit").observe(1.0)
    assert times.poll() == (0.25, 1.0)


# -- the background renderer -------------------------------------------------------------------
def _renderer(tmp_path: Path, render=None, **logging_keys):
    from service.models.build import build_model
    from service.models.ema import build_ema
    from service.train.previews import SampleRenderer

    items = [f"logging.{k}={v}" for k, v in {"sample_every": 2, "sample_n": 4, "sample_steps": 3,
                                               **logging_keys}.items()]
    cfg = load_config(None, items)
    model = build_model(cfg.model, 0)
    ema = build_ema(model, cfg.train)
    grids: list[int] = []
    kwargs = {"render": render} if render is not None else {}
    renderer = SampleRenderer(cfg, model, ema, tmp_path / "samples", torch.device("cpu"),
                              on_grid=lambda step, png: grids.append(step), **kwargs)
    return renderer, ema, grids


@pytest.mark.timeout(30)
def test_one_render_at_a_time_skips_while_busy_and_the_final_one_is_waited_for(tmp_path):
    from service.sample import generate

    release = threading.Event()
    started: list[int] = []

    def slow(unet, cfg, n, seed=0, steps=50):
        started.append(len(started))
        release.wait(10)  # the first render holds until the test lets it go
        return generate(unet, cfg, n, seed=seed, steps=steps)

    renderer, _, grids = _renderer(tmp_path, render=slow)
    renderer.maybe_render(1)  # not due
    renderer.maybe_render(2)  # starts, and blocks in `slow`
    renderer.maybe_render(4)  # the previous one still runs: skipped, training does not wait
    assert renderer.skipped == 1 and len(started) == 1
    threading.Timer(0.3, release.set).start()
    renderer.maybe_render(5, final=True)  # the last step waits for the one in flight, then renders
    renderer.close()
    assert grids == [2, 5] and renderer.rendered == 2
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-000002.png", "step-000005.png"]


@pytest.mark.timeout(30)
def test_a_stop_request_ends_every_wait_for_a_render_at_once(tmp_path):
    """SIGTERM after the final commit, while the last grid waits for a slow render: the worker
    leaves at once (a preempted pod's grace period is not spent on pictures)."""
    import time

    release = threading.Event()

    def stuck(unet, cfg, n, seed=0, steps=50):
        release.wait(20)
        raise RuntimeError("released")

    stop = threading.Event()
    renderer, _, _ = _renderer(tmp_path, render=stuck)
    renderer.should_stop = stop.is_set
    renderer.maybe_render(2)  # in flight, and it will not finish by itself
    threading.Timer(0.5, stop.set).start()
    t0 = time.monotonic()
    renderer.maybe_render(3, final=True)  # would wait up to FINAL_TIMEOUT_S (120 s)
    renderer.close()
    assert time.monotonic() - t0 < 3
    release.set()


@pytest.mark.timeout(30)
def test_rendering_leaves_the_global_rng_and_the_ema_untouched(tmp_path):
    renderer, ema, grids = _renderer(tmp_path)
    shadow = [p.clone() for p in ema.shadow_params]
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    renderer.maybe_render(2, final=True)
    renderer.close()
    assert grids == [2]
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(shadow, ema.shadow_params))


@pytest.mark.timeout(30)
def test_a_failing_render_warns_once_and_stops_rendering(tmp_path, caplog):
    calls: list[int] = []

    def broken(unet, cfg, n, seed=0, steps=50):
        calls.append(1)
        raise OSError("No space left on device")

    renderer, _, grids = _renderer(tmp_path, render=broken)
    with caplog.at_level(logging.WARNING, logger="service.train.previews"):
        renderer.maybe_render(2)
        renderer.close()  # joins the thread (bounded)
        renderer.maybe_render(4)
        renderer.maybe_render(6, final=True)
        renderer.close()
    assert calls == [1] and grids == [] and renderer.disabled
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "No space left" in warnings[0].getMessage()


def test_sample_steps_beyond_the_noise_schedule_are_a_config_error():
    with pytest.raises(UserError, match="logging.sample_steps"):
        load_config(None, ["model.num_train_timesteps=10"])
    assert load_config(None, ["model.num_train_timesteps=10", "logging.sample_steps=10"])
    assert load_config(None, ["model.num_train_timesteps=10", "logging.sample_every=0"])


@pytest.mark.timeout(10)
def test_the_tracker_run_key_is_the_runs_wherever_its_root_is_spelled_from(tmp_path, monkeypatch):
    import shutil

    from service.checkpoint.ownership import Ownership
    from service.checkpoint.storage import open_storage
    from service.train.trackers import run_key

    monkeypatch.chdir(tmp_path)
    Ownership(open_storage("runs/ftdiff/checkpoints")).claim("first-start")
    here = run_key(load_config(None))  # runs/ftdiff/checkpoints under tmp_path
    for spelled in (f"{tmp_path}/runs/ftdiff/checkpoints", f"{tmp_path}/runs/ftdiff/checkpoints/"):
        assert run_key(load_config(None, [f'checkpoint.url="{spelled}"'])) == here
    Ownership(open_storage("runs/ftdiff/checkpoints")).claim("a-restart")
    assert run_key(load_config(None)) == here  # later starts of the run: the same key
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    assert run_key(load_config(None)) != here  # another project's default root: another run
    monkeypatch.chdir(tmp_path)
    shutil.rmtree(tmp_path / "runs")  # the root emptied and a new run started in it
    Ownership(open_storage("runs/ftdiff/checkpoints")).claim("new-run")
    assert run_key(load_config(None)) != here


@pytest.mark.timeout(20)
def test_closing_a_stuck_tracker_waits_only_as_long_as_it_is_told():
    """A stop signal or a failure closes the trackers with logging_sinks.STOP_DRAIN_S: a server
    that never answers must not hold up the emergency checkpoint's exit or a restart."""
    import time

    from service.train.logging_sinks import STOP_DRAIN_S

    tracker = _Recording(lambda name: None, delay_s=30)
    tracker.open(0)
    tracker.scalars(1, {"train/loss": 1.0})
    started = time.monotonic()
    tracker.close(wait_s=STOP_DRAIN_S)
    assert time.monotonic() - started < STOP_DRAIN_S + 1
