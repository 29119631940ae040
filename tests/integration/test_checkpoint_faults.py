"""Checkpoints under real failures: kill -9, SIGTERM, crashes between commit stages, corrupt
files, world-size changes, and an S3 endpoint that goes away — on a real S3 server
(SeaweedFS) and local files, with real torchrun processes."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from service.checkpoint.catalog import Catalog
from service.checkpoint.manifest import POINTER, step_dir
from service.checkpoint.storage import open_storage
from service.errors import EXIT_PREEMPTED
from tests.helpers import (
    BASELINE_STEPS,
    assert_bitwise_equal,
    finish,
    ftdiff_inprocess,
    losses,
    popen,
    run,
    shard_name,
    single_cmd,
    torchrun_cmd,
    trace_lines,
    traced_run,
    wait_for_step,
    weights,
    worker_pids,
)


# -- crash between each pair of commit stages --------------------------------------------------
@pytest.mark.timeout(240)
@pytest.mark.parametrize("stage,expected", [
    ("after_shards", 2),     # (i) done, no .metadata: step 4 is not a checkpoint
    ("after_metadata", 2),   # (ii) done, no manifest: still not committed
    ("after_manifest", 4),   # (iii) done: committed by definition; the stale pointer is repaired
    ("after_pointer", 4),    # (iv) done
])
def test_crash_between_commit_stages_on_s3(s3_bucket, s3_server, stage, expected):
    url = f"{s3_bucket}/run"
    args = ["train.max_steps=6", "checkpoint.every_steps=2", f'checkpoint.url="{url}"']
    res = run(single_cmd(args), env={**s3_server, "FTDIFF_CRASH_AT": f"{stage}:4"}, timeout=200)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    catalog = Catalog(open_storage(url))
    assert catalog.latest()[0] == expected
    assert catalog.committed_steps() == ([2] if expected == 2 else [2, 4])

    # A restarted worker loads exactly that checkpoint: build one in this process and resume.
    from service.config import load_config
    from service.dist import DistInfo
    from service.train.loop import Trainer
    from tests.helpers import TINY

    cfg = load_config(None, TINY + args)
    trainer = Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu"), "0"))
    try:
        assert trainer.checkpointer.resume() == expected
        assert trainer.train_state.step == expected and trainer.data_state.position == expected * 8
        if stage == "after_metadata":  # and the job completes from there, rewriting step 4
            assert trainer.run() == 0
            assert Catalog(open_storage(url)).latest()[0] == 6
            assert Catalog(open_storage(url)).verify(4) == []
    finally:
        trainer.close()


# -- kill -9 of one worker under torchrun ------------------------------------------------------
@pytest.mark.timeout(240)
def test_kill9_one_worker_resumes_bitwise_equal(baseline, tmp_path):
    """With checkpoint.resume = "never", which decides the run's first start only: torchrun's
    restart resumes from the newest commit (as with the default "auto") instead of starting over.
    The object-store path: the memory tier is off here (with it on, the restart resumes at the
    survivor's step instead; tests/integration/test_memory_tier.py)."""
    resume = "never"
    ref_url, ref_loss = baseline
    dirs = traced_run(tmp_path)
    trace, url = dirs.trace, dirs.url
    proc = popen(
        torchrun_cmd([f"train.max_steps={BASELINE_STEPS}", "checkpoint.every_steps=4",
                      dirs.url_arg, "train.step_sleep_s=0.25", f'checkpoint.resume="{resume}"',
                      "checkpoint.memory_tier=false"],
                     max_restarts=2),
        env=dirs.env,
    )
    wait_for_step(trace, 6, proc)
    os.kill(worker_pids(trace)[1], signal.SIGKILL)
    code, err = finish(proc)
    assert code == 0, err[-3000:]
    steps = [line["step"] for line in trace_lines(trace) if line["rank"] == 0]
    assert len(steps) > len(set(steps)), "the kill should have forced steps to be redone"
    assert_bitwise_equal(weights(ref_url, "model"), weights(str(url), "model"))
    assert_bitwise_equal(weights(ref_url, "ema"), weights(str(url), "ema"))
    assert losses(err) == ref_loss  # the same loss at every step, the redone ones included


# -- SIGTERM: emergency checkpoint at the current step ------------------------------------------
@pytest.mark.timeout(120)
def test_sigterm_commits_current_step_and_exits_preempted(tmp_path):
    dirs = traced_run(tmp_path)
    trace, url = dirs.trace, dirs.url
    proc = popen(single_cmd(["train.max_steps=200", "checkpoint.every_steps=50", dirs.url_arg,
                             "train.step_sleep_s=0.05"]), env=dirs.env)
    wait_for_step(trace, 7, proc)
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc, 60)
    assert code == EXIT_PREEMPTED, err[-2000:]
    last = max(line["step"] for line in trace_lines(trace))
    catalog = Catalog(open_storage(str(url)))
    assert catalog.latest()[0] == last
    assert catalog.verify(last) == []


# -- elastic: world size 2 -> 1 -> 2, preempted in between ---------------------------------------
@pytest.mark.timeout(300)
def test_world_size_2_1_2_exactly_once_and_close_to_uninterrupted(baseline, tmp_path):
    ref_url, _ = baseline
    dirs = traced_run(tmp_path)
    trace, url, env = dirs.trace, dirs.url, dirs.env
    common = [f"train.max_steps={BASELINE_STEPS}", "checkpoint.every_steps=4", dirs.url_arg]
    worlds = []
    for nproc, stop_at in ((2, 3), (1, 7), (2, None)):
        slow = ["train.step_sleep_s=0.2"] if stop_at else []
        cmd = torchrun_cmd(common + slow, nproc=nproc) if nproc > 1 else single_cmd(common + slow)
        proc = popen(cmd, env=env)
        if stop_at is not None:
            wait_for_step(trace, stop_at, proc)
            proc.send_signal(signal.SIGTERM)
        code, err = finish(proc)
        assert code in (0, EXIT_PREEMPTED) or stop_at is not None, err[-3000:]
        worlds.append(Catalog(open_storage(str(url))).latest()[1].world_size)
    assert worlds == [2, 1, 2]
    lines = trace_lines(trace)
    seen = sorted((line["step"], line["rank"]) for line in lines)
    assert len(seen) == len(set(seen)), "a step was trained twice"
    positions = sorted(p for line in lines for p in line["positions"])
    assert positions == list(range(BASELINE_STEPS * 8)), "every sample exactly once"
    a, b = weights(ref_url, "model"), weights(str(url), "model")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


# -- corrupt files: verify exits 1, load falls back ---------------------------------------------
def ftdiff(*args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """`ftdiff` in this process; the S3 endpoint comes from the s3_server fixture's environment."""
    return ftdiff_inprocess(*args)


@pytest.fixture(scope="module")
def three_commits_template(s3_server):
    """One real run with commits at steps 2, 4, 6 on S3; each test gets its own copy."""
    import uuid

    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server["AWS_ENDPOINT_URL"]}, skip_instance_cache=True)
    bucket = f"ftdiff-template-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    url = f"s3://{bucket}/run"
    res = run(single_cmd(["train.max_steps=6", "checkpoint.every_steps=2", f'checkpoint.url="{url}"']),
              env=s3_server)
    assert res.returncode == 0, res.stderr[-2000:]
    return fs, f"{bucket}/run"


@pytest.fixture
def three_commits_on_s3(three_commits_template, s3_bucket):
    fs, template = three_commits_template
    target = f"{s3_bucket[len('s3://'):]}/run"
    for path in fs.find(template):
        fs.copy(path, target + path[len(template):])
    return f"s3://{target}"


def _corrupt(catalog: Catalog, how: str) -> None:
    fs, folder = catalog.storage.fs, catalog.storage.path(step_dir(6))
    shard = f"{folder}/{shard_name(catalog, 6)}"
    if how == "truncated":
        fs.pipe_file(shard, fs.cat_file(shard)[:-100])
    elif how == "flipped":
        data = bytearray(fs.cat_file(shard))
        data[len(data) // 3] ^= 0x10
        fs.pipe_file(shard, bytes(data))
    elif how == "no_manifest":
        fs.rm(f"{folder}/manifest.json")
    elif how == "garbage_pointer":
        catalog.storage.write_bytes_atomic(POINTER, b"\x00garbage{")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["truncated", "flipped", "no_manifest", "garbage_pointer"])
def test_corruption_fails_verify_and_load_falls_back(three_commits_on_s3, s3_server, how):
    url = three_commits_on_s3
    assert ftdiff("ckpt", "verify", url, env=s3_server).returncode == 0
    catalog = Catalog(open_storage(url))
    _corrupt(catalog, how)
    target = url if how == "garbage_pointer" else f"{url}/{step_dir(6)}"
    res = ftdiff("ckpt", "verify", target, env=s3_server)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr

    # Resume continues from the newest checkpoint that is intact.
    res = run(single_cmd(["train.max_steps=8", "checkpoint.every_steps=2", f'checkpoint.url="{url}"']),
              env=s3_server, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    first_trained = min(losses(res.stderr))
    assert first_trained == (7 if how == "garbage_pointer" else 5)


@pytest.mark.timeout(120)
def test_all_checkpoints_corrupt_is_a_clear_error(three_commits_on_s3, s3_server):
    url = three_commits_on_s3
    catalog = Catalog(open_storage(url))
    for step in catalog.committed_steps():
        shard = catalog.storage.path(step_dir(step), shard_name(catalog, step))
        catalog.storage.fs.pipe_file(shard, b"junk")
    res = run(single_cmd(["train.max_steps=8", "checkpoint.every_steps=2", f'checkpoint.url="{url}"']),
              env=s3_server, timeout=120)
    assert res.returncode == 2
    assert "none could be loaded" in res.stderr and "checkpoint.resume" in res.stderr


@pytest.mark.timeout(60)
def test_cli_ls_show_and_usage_errors(three_commits_on_s3, s3_server, tmp_path):
    import json

    url = three_commits_on_s3
    listing = json.loads(ftdiff("ckpt", "ls", url, "--json", env=s3_server).stdout)
    assert [e["step"] for e in listing] == [2, 4, 6] and all(e["committed"] for e in listing)
    assert {"step", "committed", "path", "bytes", "time"} <= set(listing[0])
    shown = json.loads(ftdiff("ckpt", "show", url, env=s3_server).stdout)
    assert shown["step"] == 6 and shown["world_size"] == 1
    res = ftdiff("ckpt", "verify", "s3://no-such-bucket-ftdiff/x", env=s3_server)
    assert res.returncode in (1, 2) and "Traceback" not in res.stderr
    assert ftdiff("ckpt", "verify", env=s3_server).returncode == 2  # usage


# -- S3 endpoint unreachable for a while ------------------------------------------------------
@pytest.mark.timeout(240)
def test_s3_outage_fails_saves_cleanly_and_training_continues(s3_bucket, s3_server, tmp_path):
    from tests.tcp_proxy import TcpProxy

    upstream = int(s3_server["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    url = f"{s3_bucket}/run"
    dirs = traced_run(tmp_path)
    trace = dirs.trace
    with TcpProxy(upstream) as proxy:
        env = {**s3_server, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}", **dirs.env}
        # when_busy = "skip": a save that was still writing when the link went down hangs until
        # the client gives up, and with "wait" the next save would rightly wait for it; here
        # training must not depend on when the cut falls.
        # max_steps well beyond what the outage lasts: training goes on through it, and saves
        # after it must succeed again.
        proc = popen(single_cmd(["train.max_steps=100", "checkpoint.every_steps=3", f'checkpoint.url="{url}"',
                                 "checkpoint.keep_last=100", "train.step_sleep_s=0.1",
                                 'checkpoint.when_busy="skip"']), env=env)
        wait_for_step(trace, 8, proc)
        proxy.cut()
        cut_step = max(line["step"] for line in trace_lines(trace))
        time.sleep(6)
        during = max(line["step"] for line in trace_lines(trace))
        proxy.restore()
        code, err = finish(proc)
    assert code == 0, err[-3000:]
    assert during > cut_step + 3, "training must go on while storage is down"
    committed = Catalog(open_storage(url)).committed_steps()
    assert committed[-1] == 100
    lost = [s for s in range(3, 100, 3) if s not in committed]
    assert lost, "some save during the outage should have failed"
    assert any(during < s < 100 for s in committed), "saves succeed again after the outage"
