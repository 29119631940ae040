"""Valid but suspicious settings are said (never refused): the dry run prints them."""

from __future__ import annotations

import pytest

from service.config import load_config
from service.config.advice import config_advice

pytestmark = pytest.mark.timeout(30)


def test_max_steps_within_the_warmup_is_said():
    said = config_advice(load_config(None, ["train.max_steps=40", "train.warmup_steps=50"]))
    assert any("train.warmup_steps = 50" in line and "never reaches train.lr" in line for line in said)


def test_a_checkpoint_interval_beyond_the_run_is_said():
    said = config_advice(load_config(None, ["train.max_steps=100", "checkpoint.every_steps=500"]))
    assert any("only the last step is committed" in line for line in said)


def test_the_default_job_has_nothing_to_say():
    assert config_advice(load_config(None, [])) == []

