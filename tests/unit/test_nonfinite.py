"""Non-finite steps never reach the weights (issue 25, goal 1): a NaN loss (the
FTDIFF_NAN_AT_STEP hook) skips that update — weights, optimizer and EMA stay as they were, the
data position and the schedule advance — and is counted; injected once per run."""

from __future__ import annotations

import uuid

import pytest
import torch

from service.config import load_config
from service.dist import DistInfo
from tests.helpers import TINY, assert_bitwise_equal, weights

pytestmark = pytest.mark.timeout(120)


def train(url, monkeypatch, nan_at: str | None, steps: int = 4):  # type: ignore[no-untyped-def]
    from service.train.loop import Trainer

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", f"nonfinite-{uuid.uuid4().hex}")  # never a marker of an earlier run
    (url.parent / "trace").mkdir(exist_ok=True)
    monkeypatch.setenv("FTDIFF_SAMPLE_TRACE", str(url.parent / "trace"))  # the once-marker goes there
    if nan_at:
        monkeypatch.setenv("FTDIFF_NAN_AT_STEP", nan_at)
    cfg = load_config(None, TINY + [f'checkpoint.url="{url}"', f"train.max_steps={steps}", "checkpoint.every_steps=1",
                                    "checkpoint.keep_last=10", "checkpoint.memory_tier=false", "checkpoint.async=false"])
    trainer = Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu"), "0"))
    try:
        assert trainer.run() == 0
        return trainer.metrics.train.nonfinite_steps._value.get(), trainer.data_state.position
    finally:
        trainer.close()


def test_a_nan_loss_skips_that_update_and_training_goes_on(tmp_path, monkeypatch):
    skipped, position = train(tmp_path / "nan", monkeypatch, "2")
    assert skipped == 1 and position == 4 * 8  # the position advanced past the skipped batch
    at = {step: weights(f"{tmp_path / 'nan'}/step-{step}", "model") for step in (1, 2, 3)}
    assert_bitwise_equal(at[1], at[2])  # step 2 left the weights alone
    assert_bitwise_equal(weights(f"{tmp_path / 'nan'}/step-1", "ema"), weights(f"{tmp_path / 'nan'}/step-2", "ema"))
    assert any(not torch.equal(at[2][k], at[3][k]) for k in at[2])  # step 3 trained again
    assert all(torch.isfinite(v).all() for v in weights(str(tmp_path / "nan"), "model").values())


def test_the_hook_fires_once_per_run_and_only_on_its_rank(tmp_path, monkeypatch):
    from service.faults import StepProbe

    env = {"FTDIFF_NAN_AT_STEP": "3:1", "TORCHELASTIC_RUN_ID": "once", "FTDIFF_SAMPLE_TRACE": str(tmp_path)}
    loss = torch.tensor(1.0)
    assert torch.equal(StepProbe(0, 2, env=env).loss(3, loss), loss)  # another rank
    assert torch.isnan(StepProbe(1, 2, env=env).loss(3, loss))
    assert torch.equal(StepProbe(1, 2, env=env).loss(3, loss), loss)  # a restarted worker: not again
    assert torch.equal(StepProbe(1, 2, env=env).loss(4, loss), loss)
