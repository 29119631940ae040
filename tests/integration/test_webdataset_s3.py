"""Training on a sharded data set on the real S3 server (SeaweedFS on loopback): a folder with
classes and captions packed into shards by `ftdiff data pack`, read by 2 ranks with 2 loader
workers each through the shard cache — a kill -9 mid-run ends bitwise equal to a clean run, and
a run preempted at 2 ranks and finished at 1 trains every remaining position exactly once."""

from __future__ import annotations

import os
import signal

import pytest

from tests.helpers import (
    BASELINE_STEPS,
    assert_bitwise_equal,
    finish,
    ftdiff_inprocess,
    popen,
    run,
    single_cmd,
    torchrun_cmd,
    trace_lines,
    traced_run,
    wait_for_step,
    weights,
    why,
    worker_pids,
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, s3_server) -> str:
    """48 images in 3 classes, a third captioned, packed into ~10 shards in a fresh bucket."""
    import uuid

    import s3fs
    from PIL import Image

    src = tmp_path_factory.mktemp("images")
    for i in range(48):
        folder = src / ("circle", "square", "triangle")[i % 3]
        folder.mkdir(exist_ok=True)
        Image.new("RGB", (16, 16), (5 * i, 255 - 5 * i, 80)).save(folder / f"{i:02d}.png")
        if i % 3 == 0:
            (folder / f"{i:02d}.txt").write_text(f"picture {i}")
    bucket = f"ftdiff-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    url = f"s3://{bucket}/shapes"
    res = ftdiff_inprocess("data", "pack", str(src), url, "--shard-size", "4kB")
    assert res.returncode == 0, res.stderr
    assert "48 images into" in res.stdout and "3 classes" in res.stdout
    return url


def settings(url: str, cache) -> list[str]:  # type: ignore[no-untyped-def]
    return ['data.kind="webdataset"', f'data.url="{url}"', "data.shuffle_window=12", "data.num_workers=2",
            f'data.cache_dir="{cache}"', 'model.conditioning="class"', "model.num_classes=3",
            f"train.max_steps={BASELINE_STEPS}", "checkpoint.every_steps=4"]


@pytest.fixture(scope="module")
def clean_run(shards, tmp_path_factory) -> str:
    url = tmp_path_factory.mktemp("clean")
    res = run(torchrun_cmd(settings(shards, url / "cache") + [f'checkpoint.url="{url / "ckpt"}"']))
    assert res.returncode == 0, why(res)
    # Loader workers on S3 leave no client of their parent's to be collected on their loop.
    assert "Task exception" not in res.stderr and "different loop" not in res.stderr, res.stderr[-2000:]
    return str(url / "ckpt")


@pytest.mark.timeout(300)
def test_kill9_mid_run_ends_bitwise_equal_to_a_clean_run(shards, clean_run, tmp_path):
    dirs = traced_run(tmp_path)
    proc = popen(torchrun_cmd(settings(shards, tmp_path / "cache") + [
        dirs.url_arg, "train.step_sleep_s=0.25", "checkpoint.memory_tier=false"], max_restarts=2),
        env={**dirs.env, "FTDIFF_RUN_ID": f"wds-kill-{os.getpid()}"})
    wait_for_step(dirs.trace, 6, proc)
    os.kill(worker_pids(dirs.trace)[1], signal.SIGKILL)
    code, err = finish(proc)
    assert code == 0, err[-3000:]
    assert_bitwise_equal(weights(clean_run, "model"), weights(str(dirs.url), "model"))
    assert_bitwise_equal(weights(clean_run, "ema"), weights(str(dirs.url), "ema"))


@pytest.mark.timeout(300)
def test_preempted_at_2_ranks_and_finished_at_1_trains_each_position_exactly_once(shards, tmp_path):
    dirs = traced_run(tmp_path)
    common = settings(shards, tmp_path / "cache") + [dirs.url_arg]
    proc = popen(torchrun_cmd(common + ["train.step_sleep_s=0.2"]), env=dirs.env)
    wait_for_step(dirs.trace, BASELINE_STEPS // 2, proc)
    proc.send_signal(signal.SIGTERM)
    code, _ = finish(proc)
    assert code != 0, "the first half should have been preempted"
    rest = run(single_cmd(common + ["data.num_workers=0"]), env=dirs.env)
    assert rest.returncode == 0, why(rest)
    lines = trace_lines(dirs.trace)
    assert {line["world_size"] for line in lines} == {1, 2}
    positions = sorted(p for line in lines for p in line["positions"])
    assert positions == list(range(BASELINE_STEPS * 8)), "every position exactly once"


@pytest.mark.timeout(300)
def test_slow_shard_reads_are_progress_not_a_hang(tmp_path, s3_server, s3_bucket):
    """Every request to the store 2.5 s slower, and the first batch needs every shard: the
    first step comes long after a hang timeout. Waiting for a batch is the "reading" phase, a
    storage phase (bytes count as progress; the storage limit applies), so no hang is called."""
    import time

    from PIL import Image

    from service.data.pack import pack_folder
    from tests.helpers import HANG_TIMEOUT, SupervisedJob
    from tests.tcp_proxy import TcpProxy

    src = tmp_path / "images"
    src.mkdir()
    for i in range(24):
        Image.new("RGB", (16, 16), (9 * i, 40, 200)).save(src / f"{i:02d}.png")
    url = f"{s3_bucket}/slow"
    pack_folder(str(src), url, shard_bytes=2000)  # ~8 shards
    upstream = int(s3_server["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    with TcpProxy(upstream) as proxy:
        proxy.delay_s = 2.5
        env = {**s3_server, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
        job = SupervisedJob(tmp_path / "job", ['data.kind="webdataset"', f'data.url="{url}"', "data.shuffle_window=24",
                                               f'data.cache_dir="{tmp_path / "cache"}"', "train.max_steps=3",
                                               "checkpoint.every_steps=100"], env=env)
        started = time.monotonic()
        job.wait_step(1)
        first_step_after = time.monotonic() - started
        hangs = job.metric('ftdiff_job_failures_detected_total{kind="hang"}')
        code, err = job.finish(150)
    assert code == 0, err[-3000:]
    assert first_step_after > 6 + 2 * HANG_TIMEOUT, f"step 1 after {first_step_after:.1f}s: not slow enough to test"
    assert hangs == 0 and "hang detected" not in err, err[-6000:]
