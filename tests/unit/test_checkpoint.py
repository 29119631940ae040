"""The commit protocol, discovery, verification and retention, in one process."""

import json
import threading
import uuid

import pytest
import torch

from service.checkpoint.catalog import Catalog
from service.checkpoint.manifest import (
    POINTER,
    FileEntry,
    Manifest,
    pointer_json,
    step_dir,
)
from service.checkpoint.retention import apply_retention, plan_deletions
from service.checkpoint.storage import open_storage
from service.checkpoint.storage_check import check_reachable
from service.config import load_config
from service.errors import UserError
from tests.helpers import CheckpointJob as Job
from tests.helpers import shard_name


@pytest.fixture
def mem_url() -> str:
    return f"memory://ckpt-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("async_", [True, False])
def test_save_commit_resume_round_trip(mem_url, async_):
    job = Job(mem_url, f"checkpoint.async={'true' if async_ else 'false'}")
    for _ in range(3):
        job.step()
        job.ckpt.save(job.train.step, job.train.step * 4)
    job.ckpt.wait()
    expected = job.weights()
    job.ckpt.close()
    assert job.ckpt.last_committed_step == 3

    fresh = Job(mem_url, seed=7)
    assert fresh.ckpt.resume() == 3
    assert fresh.train.step == 3
    for k, v in fresh.weights().items():
        assert torch.equal(v, expected[k])
    assert fresh.opt.state_dict()["state"][0]["step"] == 3
    catalog = Catalog(open_storage(mem_url))
    m = catalog.manifest(3)
    assert m.world_size == 1 and m.samples_seen == 12 and ".metadata" in m.files
    assert json.loads(catalog.storage.read_bytes(POINTER)) == {"step": 3, "path": step_dir(3)}


def test_async_snapshot_is_isolated_from_later_updates(mem_url):
    job = Job(mem_url)
    job.step()
    before = job.weights()
    job.ckpt.save_at(1, 4, blocking=False)
    job.ckpt.before_update()  # the trainer's contract: the copy is done before weights change
    with torch.no_grad():  # mutate right away, while the write may still be in flight
        for p in job.model.parameters():
            p.add_(100)
    assert job.ckpt.wait() is True
    fresh = Job(mem_url, seed=3)
    fresh.ckpt.resume()
    for k, v in fresh.weights().items():
        assert torch.equal(v, before[k])


def test_staging_buffers_are_reused(mem_url):
    job = Job(mem_url)
    job.step()
    job.ckpt.save_at(1, 0, blocking=False)
    job.ckpt.wait()
    buffers = {k: v.data_ptr() for k, v in job.ckpt.staging.buffers.items()}
    job.step()
    job.ckpt.save_at(2, 0, blocking=False)
    job.ckpt.wait()
    assert buffers and {k: v.data_ptr() for k, v in job.ckpt.staging.buffers.items()} == buffers


def test_warm_up_allocates_the_buffers_the_first_save_uses(mem_url):
    job = Job(mem_url)
    job.ckpt.warm_up()  # no optimizer step yet: must not touch the optimizer, nor allocate
    assert not job.opt.state and not job.ckpt.staging.buffers
    job.step()
    job.ckpt.warm_up()
    job.ckpt.drain()
    buffers = {k: v.data_ptr() for k, v in job.ckpt.staging.buffers.items()}
    assert {"model.weight", "optimizer.state.weight.exp_avg", "optimizer.state.bias.exp_avg_sq"} <= set(buffers)
    expected = job.weights()
    job.ckpt.save_at(1, 0, blocking=False)
    assert job.ckpt.wait() is True
    assert {k: v.data_ptr() for k, v in job.ckpt.staging.buffers.items()} == buffers
    fresh = Job(mem_url, seed=3)
    assert fresh.ckpt.resume() == 1
    assert all(torch.equal(v, expected[k]) for k, v in fresh.weights().items())


def _fake_commit(catalog: Catalog, step: int) -> None:
    catalog.storage.fs.pipe_file(catalog.storage.path(step_dir(step), ".metadata"), b"x")
    catalog.write_manifest(Manifest(step, 1, "h", {".metadata": FileEntry(1, "00000000")}))


class CountingFs:
    """Counts storage requests: outermost calls only (memory's exists() calls info())."""

    METHODS = ("cat_file", "exists", "ls", "info", "find", "glob", "open", "size", "du")

    def __init__(self, fs):
        self.calls = []
        self.depth = 0
        for name in self.METHODS:
            original = getattr(fs, name)

            def wrapper(*a, _name=name, _orig=original, **kw):
                if self.depth == 0:
                    self.calls.append(_name)
                self.depth += 1
                try:
                    return _orig(*a, **kw)
                finally:
                    self.depth -= 1

            setattr(fs, name, wrapper)


def test_latest_costs_at_most_three_requests_with_1000_checkpoints(mem_url):
    catalog = Catalog(open_storage(mem_url))
    for step in range(10, 10_010, 10):
        _fake_commit(catalog, step)
    catalog.write_pointer(10_000)
    counter = CountingFs(catalog.storage.fs)
    step, _ = catalog.latest()
    assert step == 10_000
    assert len(counter.calls) <= 3, counter.calls


@pytest.mark.parametrize("pointer", [None, b"garbage", pointer_json(20), pointer_json(50),
                                     b'{"step": 1e999}', b'{"step": NaN}'])
def test_missing_stale_or_bad_pointer_falls_back_to_scan(mem_url, pointer):
    catalog = Catalog(open_storage(mem_url))
    for step in (10, 20, 30):
        _fake_commit(catalog, step)
    # an uncommitted folder newer than every commit must not count
    catalog.storage.fs.pipe_file(catalog.storage.path(step_dir(40), "__0_0.distcp"), b"partial")
    if pointer is not None:
        catalog.storage.write_bytes_atomic(POINTER, pointer)
    assert catalog.latest()[0] == 30


def test_verify_detects_truncation_flip_and_missing_manifest(mem_url):
    job = Job(mem_url)
    for _ in range(2):
        job.step()
        job.ckpt.save_at(job.train.step, 0, blocking=True)
    catalog = job.ckpt.catalog
    assert catalog.verify(1) == [] and catalog.verify(2) == []
    fs, folder = catalog.storage.fs, catalog.storage.path(step_dir(2))
    shard = f"{folder}/{shard_name(catalog, 2)}"
    data = fs.cat_file(shard)
    fs.pipe_file(shard, data[: len(data) // 2])
    assert any("size" in p for p in catalog.verify(2))
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF
    fs.pipe_file(shard, bytes(flipped))
    assert any("crc32c" in p for p in catalog.verify(2))
    fs.rm(f"{folder}/manifest.json")
    assert any("not committed" in p for p in catalog.verify(2))


def test_corrupt_newest_falls_back_to_previous(mem_url):
    job = Job(mem_url)
    saved = {}
    for _ in range(2):
        job.step()
        job.ckpt.save_at(job.train.step, 0, blocking=True)
        saved[job.train.step] = job.weights()
    fs = job.ckpt.storage.fs
    shard = job.ckpt.storage.path(step_dir(2), shard_name(job.ckpt.catalog, 2))
    data = bytearray(fs.cat_file(shard))
    data[100] ^= 0x01
    fs.pipe_file(shard, bytes(data))
    fresh = Job(mem_url, seed=9)
    assert fresh.ckpt.resume() == 1
    for k, v in fresh.weights().items():
        assert torch.equal(v, saved[1][k])
    assert fresh.metrics.verify_failures._value.get() == 1

    # Training goes on from step 1; reaching step 2 again, the save replaces the corrupt
    # folder (rather than taking "already committed" for an answer) and the result loads.
    fresh.step()
    assert fresh.ckpt.save_at(2, 0, blocking=True)
    assert fresh.ckpt.catalog.verify(2) == []
    again = Job(mem_url, seed=5)
    assert again.ckpt.resume() == 2
    for k, v in again.weights().items():
        assert torch.equal(v, fresh.weights()[k])


def test_a_fork_from_a_root_whose_newest_checkpoint_is_corrupt_is_refused_not_moved_back(mem_url):
    """Its own root's resume falls back to an older commit; a fork from another root would then
    start from a step nobody asked for, the parent's newer steps silently dropped."""
    job = Job(mem_url)
    for step in (1, 2):
        job.step()
        job.ckpt.save_at(step, 0, blocking=True)
    fs = job.ckpt.storage.fs
    fs.pipe_file(job.ckpt.storage.path(step_dir(2), shard_name(job.ckpt.catalog, 2)), b"junk")
    with pytest.raises(UserError, match="could not be loaded") as e:
        Job(mem_url + "-fork", f'checkpoint.resume="{mem_url}"').ckpt.resume()
    assert "step-000000002" in str(e.value) and f"ftdiff ckpt ls {mem_url}" in str(e.value)
    assert Job(mem_url).ckpt.resume() == 1  # its own resume still falls back


def test_no_loadable_checkpoint_is_an_error_not_a_fresh_start(mem_url):
    job = Job(mem_url)
    job.step()
    job.ckpt.save_at(1, 0, blocking=True)
    fs = job.ckpt.storage.fs
    fs.pipe_file(job.ckpt.storage.path(step_dir(1), shard_name(job.ckpt.catalog, 1)), b"junk")
    with pytest.raises(UserError, match="none could be loaded") as e:
        Job(mem_url).ckpt.resume()
    assert "new location" in str(e.value)
    # Starting afresh on top of them is no way out: that would mix two runs in one root.
    with pytest.raises(UserError, match="never mixes"):
        Job(mem_url, 'checkpoint.resume="never"').ckpt.resume()
    # A fork from it (another root, that checkpoint pinned) is pointed at the others, not at a new root.
    with pytest.raises(UserError, match="could not be loaded") as e:
        Job(mem_url + "-fork", f'checkpoint.resume="{mem_url}/step-000000001"').ckpt.resume()
    assert f"ftdiff ckpt ls {mem_url}" in str(e.value) and "--from" in str(e.value)
    assert "new location" not in str(e.value)


def test_resume_from_explicit_url(mem_url, tmp_path):
    job = Job(mem_url)
    for _ in range(3):
        job.step()
        job.ckpt.save_at(job.train.step, 0, blocking=True)
    other = f"memory://other-{uuid.uuid4().hex[:6]}"
    fresh = Job(other, f'checkpoint.resume="{mem_url}/{step_dir(2)}"')
    assert fresh.ckpt.resume() == 2 and fresh.train.step == 2
    assert Job(other, f'checkpoint.resume="{mem_url}"').ckpt.resume() == 3


def test_never_writes_into_a_committed_folder(mem_url):
    job = Job(mem_url)
    job.step()
    assert job.ckpt.save_at(1, 0, blocking=True)
    manifest = job.ckpt.catalog.storage.read_bytes(f"{step_dir(1)}/manifest.json")
    job.step()  # different weights, same step number
    assert job.ckpt.save_at(1, 0, blocking=True)
    assert job.ckpt.catalog.storage.read_bytes(f"{step_dir(1)}/manifest.json") == manifest


def test_retention_plan():
    assert plan_deletions([10, 20, 30, 40], [], 2, 0) == [10, 20]
    assert plan_deletions([10, 20, 30, 40], [], 2, 20) == [10]
    assert plan_deletions([10, 20, 30], [25, 35], 2, 0) == [10, 25]
    assert plan_deletions([], [5], 2, 0) == []
    assert plan_deletions([40], [], 1, 0) == []


def test_retention_runs_after_commits_and_keeps_newest_when_a_save_fails(mem_url, monkeypatch):
    job = Job(mem_url, "checkpoint.keep_last=2", "checkpoint.keep_every=2")
    for _ in range(5):
        job.step()
        assert job.ckpt.save_at(job.train.step, 0, blocking=True)
    job.ckpt.drain()
    catalog = job.ckpt.catalog
    assert catalog.committed_steps() == [2, 4, 5]

    import service.checkpoint.commit as commit

    def broken_save(*_a, **_k):
        raise OSError("disk on fire")

    monkeypatch.setattr(commit.dcp, "save", broken_save)
    job.step()
    assert job.ckpt.save_at(6, 0, blocking=False) is None
    assert job.ckpt.wait() is False
    assert job.ckpt.failures == 1
    assert job.metrics.failures.labels(stage="write")._value.get() == 1
    job.ckpt.drain()
    assert catalog.committed_steps() == [2, 4, 5]
    assert catalog.latest()[0] == 5


def test_slow_deletions_do_not_hold_up_the_next_save(mem_url, monkeypatch):
    import service.checkpoint.manager as manager

    gate = threading.Event()
    real_retention = manager.apply_retention
    monkeypatch.setattr(manager, "apply_retention", lambda *a: gate.wait(30) and real_retention(*a))
    job = Job(mem_url, "checkpoint.keep_last=2")
    for _ in range(4):
        job.step()
        job.ckpt.save_at(job.train.step, 0, blocking=False)
        job.ckpt.before_update()
        assert job.ckpt.wait() is True  # commits while every deletion is still blocked
    assert job.ckpt.catalog.committed_steps() == [1, 2, 3, 4]
    gate.set()
    job.ckpt.drain()
    assert job.ckpt.catalog.committed_steps() == [3, 4]


def test_failed_deletion_is_retried_later(mem_url, monkeypatch):
    catalog = Catalog(open_storage(mem_url))
    for step in (1, 2, 3):
        _fake_commit(catalog, step)
    original = catalog.delete
    monkeypatch.setattr(catalog, "delete", lambda step: (_ for _ in ()).throw(OSError("503")))
    deleted, failed = apply_retention(catalog, 2, 0)
    assert deleted == [] and failed == [1]
    monkeypatch.setattr(catalog, "delete", original)
    _fake_commit(catalog, 4)
    deleted, failed = apply_retention(catalog, 2, 0)
    assert deleted == [1, 2] and failed == []
    assert catalog.committed_steps() == [3, 4]


def test_storage_errors_name_the_url_not_secrets(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError) as e:
        check_reachable(open_storage(f"{f}/sub"))
    assert str(f) in str(e.value)
    with pytest.raises(UserError) as e:
        open_storage("nosuchproto://x/y")
    assert "nosuchproto" in str(e.value)


def test_snapshot_copy_overlaps_until_before_update(mem_url, monkeypatch):
    """save() returns before the copy is done; before_update() blocks until it is."""
    job = Job(mem_url)
    job.step()
    gate = threading.Event()
    original = job.ckpt.staging.copy

    def slow_copy(*args):
        gate.wait(5)
        return original(*args)

    monkeypatch.setattr(job.ckpt.staging, "copy", slow_copy)
    job.ckpt.save_at(1, 0, blocking=False)
    assert not job.ckpt._snapshot_done.is_set()  # the copy is still pending: no stall yet
    threading.Timer(0.2, gate.set).start()
    job.ckpt.before_update()
    assert job.ckpt.last_stall_s >= 0.15
    assert job.ckpt.wait() is True


def test_local_load_verifies_files(tmp_path):
    job = Job(str(tmp_path))
    for _ in range(2):
        job.step()
        job.ckpt.save_at(job.train.step, 0, blocking=True)
    shard = tmp_path / step_dir(2) / shard_name(job.ckpt.catalog, 2)
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x04
    shard.write_bytes(bytes(data))
    fresh = Job(str(tmp_path), seed=4)
    assert fresh.ckpt.resume() == 1


def test_skip_policy_skips_and_counts(mem_url):
    job = Job(mem_url, 'checkpoint.when_busy="skip"')
    job.step()
    job.ckpt.save(1, 0, busy_anywhere=True)
    assert job.ckpt.skipped == 1 and job.metrics.saves_skipped._value.get() == 1
    assert job.ckpt.catalog.committed_steps() == []
    job.ckpt.save(1, 0, busy_anywhere=False)
    assert job.ckpt.wait() is True
    wait_job = Job(f"{mem_url}-w")  # default policy: wait, never skip
    wait_job.step()
    wait_job.ckpt.save(1, 0, busy_anywhere=True)
    assert wait_job.ckpt.wait() is True


def test_writer_threads_split_each_rank_into_several_files(mem_url):
    job = Job(mem_url, "checkpoint.writer_threads=2")
    job.step()
    assert job.ckpt.save_at(1, 0, blocking=True)
    files = job.ckpt.catalog.manifest(1).files
    assert len([f for f in files if f.endswith(".distcp")]) == 2
    assert Job(mem_url, seed=3).ckpt.resume() == 1


def test_writer_skips_zip_crc32_only_while_writing(tmp_path):
    """torch.save's own zip CRC-32 is skipped for checkpoint files (ours covers every byte),
    and the process-wide switch is restored afterwards."""
    from torch.utils.serialization import config

    job = Job(str(tmp_path))
    job.step()
    assert config.save.compute_crc32 is True
    assert job.ckpt.save_at(1, 0, blocking=True)
    assert config.save.compute_crc32 is True
    shard = (tmp_path / step_dir(1) / shard_name(job.ckpt.catalog, 1)).read_bytes()
    # Zip central directory entries ("PK\x01\x02") carry each record's CRC-32 at byte 16.
    entries = [i for i in range(len(shard) - 4) if shard[i:i + 4] == b"PK\x01\x02"]
    assert entries and all(shard[i + 16:i + 20] == b"\0\0\0\0" for i in entries)
    assert Job(str(tmp_path), seed=3).ckpt.resume() == 1


def test_writer_threads_default_to_parallel_uploads_on_object_stores(mem_url):
    assert Job("s3://bucket/run", "checkpoint.endpoint_url=\"http://127.0.0.1:9\"").ckpt.commits.writer_threads() == 4
    assert Job(mem_url).ckpt.commits.writer_threads() == 1
    assert Job("s3://bucket/run", "checkpoint.writer_threads=2").ckpt.commits.writer_threads() == 2


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected failure
def test_a_failing_writer_thread_fails_the_save_instead_of_committing_a_partial_checkpoint(mem_url, monkeypatch):
    """DCP's extra writer threads swallow their errors; the save must still fail (and the
    previous commit stay the newest), never commit a checkpoint with items missing."""
    from service.checkpoint import dcp_io

    job = Job(mem_url, "checkpoint.writer_threads=2")
    job.step()
    assert job.ckpt.save_at(1, 0, blocking=True)
    real_create = dcp_io._HashingFs.create_stream

    def failing_in_extra_thread(self, path, mode):
        # A blocking save writes on the main thread, plus one extra DCP thread: fail only there.
        if "w" in mode and str(path).endswith(".distcp") and threading.current_thread() is not threading.main_thread():
            raise OSError("injected: upload failed")
        return real_create(self, path, mode)

    monkeypatch.setattr(dcp_io._HashingFs, "create_stream", failing_in_extra_thread)
    job.step()
    assert job.ckpt.save_at(2, 0, blocking=True) is False
    assert job.metrics.failures.labels(stage="write")._value.get() == 1
    assert job.ckpt.catalog.committed_steps() == [1]
    monkeypatch.undo()
    job.step()
    assert job.ckpt.save_at(3, 0, blocking=True)
    assert Job(mem_url, seed=4).ckpt.resume() == 3


def test_the_last_step_is_committed_once_or_fails_loudly(mem_url, monkeypatch):
    import service.checkpoint.commit as commit
    from service.checkpoint.errors import CheckpointNotCommitted

    job = Job(mem_url, "checkpoint.every_steps=10")
    job.ckpt.resume()
    calls = []
    real_save = commit.dcp.save
    monkeypatch.setattr(commit.dcp, "save", lambda *a, **k: calls.append(1) or real_save(*a, **k))
    job.step()
    job.ckpt.save(1, 0, last_step=True)
    job.ckpt.save(1, 0, last_step=True)  # already committed by this start: not written again
    assert calls == [1] and job.ckpt.catalog.latest()[0] == 1

    monkeypatch.setattr(commit.dcp, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    job.step()
    with pytest.raises(CheckpointNotCommitted, match="final checkpoint at step 2"):
        job.ckpt.save(2, 0, last_step=True)
    with pytest.raises(CheckpointNotCommitted, match="emergency checkpoint at step 2"):
        job.ckpt.save(2, 0, emergency=True)
    assert job.ckpt.catalog.latest()[0] == 1


def test_the_trainer_never_lets_warm_up_create_optimizer_state(tmp_path):
    """Asking an optimizer without state for its state dict makes DCP run a zero-lr step
    (changing the run): the trainer's predicate holds warm-up back until the first step."""
    from service.dist import DistInfo
    from service.train.loop import Trainer
    from tests.helpers import TINY

    cfg = load_config(None, TINY + [f'checkpoint.url="{tmp_path}"'])
    trainer = Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu"), "0"))
    try:
        trainer.checkpointer.warm_up()
        trainer.checkpointer.drain()
        assert not trainer.optimizer.state and not trainer.checkpointer.staging.buffers
    finally:
        trainer.close()
