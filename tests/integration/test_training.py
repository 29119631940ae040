"""Real torchrun jobs of the tiny preset on CPU (gloo): determinism, DDP, learning, bad input."""

import sys

import pytest
import torch

from tests.helpers import (
    assert_bitwise_equal,
    losses,
    run,
    set_args,
    single_cmd,
    torchrun_cmd,
    weights,
    why,
)

STEPS = 12  # = conftest.BASELINE_STEPS


@pytest.mark.timeout(180)
def test_two_ranks_train_and_commit_final_step(baseline):
    url, loss = baseline
    from service.checkpoint.catalog import Catalog
    from service.checkpoint.storage import open_storage

    catalog = Catalog(open_storage(url))
    assert catalog.latest()[0] == STEPS
    assert catalog.manifest(STEPS).world_size == 2
    assert sorted(loss) == list(range(1, STEPS + 1))


@pytest.mark.timeout(180)
def test_same_seed_gives_bitwise_identical_weights(baseline, tmp_path):
    url, loss = baseline
    res = run(torchrun_cmd([f"train.max_steps={STEPS}", "checkpoint.every_steps=4", f'checkpoint.url="{tmp_path}"']))
    assert res.returncode == 0, why(res)
    assert_bitwise_equal(weights(url, "model"), weights(str(tmp_path), "model"))
    assert_bitwise_equal(weights(url, "ema"), weights(str(tmp_path), "ema"))
    assert losses(res.stderr) == loss


@pytest.mark.timeout(180)
def test_world_size_one_matches_two_within_float_tolerance(baseline, tmp_path):
    url, loss = baseline
    res = run(single_cmd([f"train.max_steps={STEPS}", "checkpoint.every_steps=4", f'checkpoint.url="{tmp_path}"']))
    assert res.returncode == 0, why(res)
    a, b = weights(url, "model"), weights(str(tmp_path), "model")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    one = losses(res.stderr)
    for step in loss:
        assert one[step] == pytest.approx(loss[step], rel=1e-4)


@pytest.mark.timeout(300)
def test_loss_falls_on_the_default_data(tmp_path):
    res = run(single_cmd([
        "train.max_steps=100", "train.global_batch_size=16", "train.lr=1e-3", "train.warmup_steps=10",
        "checkpoint.every_steps=100", f'checkpoint.url="{tmp_path}"', "data.epoch_size=2000",
    ]), timeout=280)
    assert res.returncode == 0, why(res)
    loss = losses(res.stderr)
    first = sum(loss[s] for s in range(1, 11)) / 10
    last = sum(loss[s] for s in range(81, 101)) / 20
    assert last < 0.3 * first, (first, last)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("overrides,needle", [
    (["train.max_stepz=3"], "train.max_stepz"),
    (["train.max_steps=\"ten\""], "train.max_steps"),
    (["train.global_batch_size=9"], "not divisible by the world size 2"),
    (["data.kind=\"folder\"", "data.url=\"{empty}\""], "holds no images"),
    (["checkpoint.url=\"{file}/sub\""], "storage URL"),
])
def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(tmp_path, overrides, needle):
    empty = tmp_path / "empty"
    empty.mkdir()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    ckpt = tmp_path / "ckpt"
    args = [o.format(empty=empty, file=blocker) for o in overrides]
    if not any(a.startswith("checkpoint.url") for a in args):
        args.append(f'checkpoint.url="{ckpt}"')
    if "world size 2" in needle:  # a 2-rank job: the launcher refuses before starting anything
        res = run([sys.executable, "-m", "service.cli", "train", "--nproc-per-node", "2",
                   "--set", "supervisor.port=0", "--set", "metrics.port=0", *set_args(args)], timeout=100)
        assert res.returncode == 2, res.stderr[-2000:]
        assert needle in res.stderr and "Traceback" not in res.stderr
    else:
        res = run(single_cmd(["train.max_steps=2", *args]), timeout=100)
        assert res.returncode == 2, res.stderr[-2000:]
        assert needle in res.stderr
        assert "Traceback" not in res.stderr
    assert not ckpt.exists()
