"""A checkpoint root belongs to one run and one incarnation at a time (in one process)."""

from __future__ import annotations

import json
import os
import threading
import uuid

import pytest
import torch

from service.checkpoint.catalog import Catalog
from service.checkpoint.errors import FencedError
from service.checkpoint.manifest import POINTER, step_dir
from service.checkpoint.ownership import Ownership
from service.checkpoint.storage import open_storage
from service.errors import UserError
from tests.helpers import CheckpointJob as Job
from tests.helpers import shard_name

STORES = ["memory", "file"]
# Where the store's own semantics matter (conditional writes, listings), S3 too: a real server.
ALL_STORES = [*STORES, pytest.param("s3", marks=pytest.mark.multiprocess)]


@pytest.fixture(params=STORES)
def url(request, tmp_path) -> str:
    return _url(request, tmp_path)


@pytest.fixture(params=ALL_STORES)
def any_url(request, tmp_path) -> str:
    """The same rules on every kind of store; on S3 through the real protocol (SeaweedFS on
    loopback), where incarnations and the pointer use conditional writes."""
    return _url(request, tmp_path)


def _url(request, tmp_path) -> str:  # type: ignore[no-untyped-def]
    if request.param == "s3":
        return f"{request.getfixturevalue('s3_bucket')}/run"
    return f"memory://own-{uuid.uuid4().hex[:8]}" if request.param == "memory" else str(tmp_path / "ckpt")


def _train(job: Job, steps: int) -> None:
    for _ in range(steps):
        job.step()
        assert job.ckpt.save_at(job.train.step, 0, blocking=True)


def _files(url: str) -> dict[str, bytes]:
    storage = open_storage(url)
    out = {}
    for step in Catalog(storage).step_folders():
        for name in storage.list_dir(step_dir(step)):
            out[f"{step_dir(step)}/{name}"] = storage.read_bytes(f"{step_dir(step)}/{name}")
    return out


@pytest.mark.timeout(60)
def test_a_fresh_run_into_another_runs_root_is_refused_and_changes_nothing(url):
    first = Job(url, run_id="run-1")
    first.ckpt.resume()
    _train(first, 3)
    first.ckpt.close()
    before = _files(url)
    second = Job(url, 'checkpoint.resume="never"', run_id="run-2", seed=5)
    with pytest.raises(UserError, match="never mixes") as e:
        second.ckpt.resume()
    assert str(url).split("://")[-1] in str(e.value)
    assert _files(url) == before  # nothing overwritten, nothing deleted


@pytest.mark.timeout(60)
def test_a_refused_start_does_not_fence_off_the_run_that_owns_the_root(any_url):
    running = Job(any_url, run_id="run-1")
    running.ckpt.resume()
    _train(running, 1)
    with pytest.raises(UserError):
        Job(any_url, 'checkpoint.resume="never"', run_id="run-2").ckpt.resume()
    with pytest.raises(UserError):
        Job(any_url, "run.seed=3", run_id="run-3").ckpt.resume()
    _train(running, 1)  # still the newest start: it goes on committing
    assert running.ckpt.catalog.latest()[0] == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("change, key", [
    ("run.seed=7", "run.seed"),
    ("train.global_batch_size=32", "train.global_batch_size"),
    ("model.num_train_timesteps=500", "model.num_train_timesteps"),
    ("data.epoch_size=999", "data.epoch_size"),
])
def test_resuming_with_changed_math_is_refused_naming_the_keys(url, change, key):
    first = Job(url)
    first.ckpt.resume()
    _train(first, 2)
    before = _files(url)
    with pytest.raises(UserError) as e:
        Job(url, change).ckpt.resume()
    assert key in str(e.value) and "ftdiff train --from" in str(e.value)  # the way out, exactly
    assert _files(url) == before


@pytest.mark.timeout(60)
def test_settings_outside_the_math_may_change(url):
    first = Job(url)
    first.ckpt.resume()
    _train(first, 2)
    later = Job(url, "train.max_steps=999", "checkpoint.keep_last=5", "supervisor.hang_timeout_s=9",
                "checkpoint.writer_threads=2")
    assert later.ckpt.resume() == 2


@pytest.mark.timeout(60)
def test_a_pinned_start_applies_once_restarts_resume_the_newest_commit(url, tmp_path):
    source = f"memory://source-{uuid.uuid4().hex[:6]}"
    origin = Job(source)
    _train(origin, 2)
    for resume in ('"never"', f'"{source}/{step_dir(1)}"'):
        target = f"{url}-{abs(hash(resume))}"
        first = Job(target, f"checkpoint.resume={resume}", run_id="run-A")
        first_step = first.ckpt.resume()
        assert first_step == (None if resume == '"never"' else 1)
        _train(first, 3)  # commits up to 3 or 4
        newest = first.train.step
        first.ckpt.close()
        again = Job(target, f"checkpoint.resume={resume}", seed=9, run_id="run-A", restart_count=1)
        assert again.ckpt.resume() == newest
        assert again.train.step == newest


@pytest.mark.timeout(60)
def test_going_back_inside_the_own_root_is_refused(url):
    job = Job(url)
    job.ckpt.resume()
    _train(job, 3)
    with pytest.raises(UserError, match="new location"):
        Job(url, f'checkpoint.resume="{url}/{step_dir(1)}"').ckpt.resume()
    assert Job(url, f'checkpoint.resume="{url}/{step_dir(3)}"').ckpt.resume() == 3  # its newest: fine


@pytest.mark.timeout(60)
def test_pointer_is_a_hint_an_off_interval_commit_with_a_lost_pointer_write_wins(any_url, monkeypatch):
    job = Job(any_url, "checkpoint.every_steps=50")
    job.ckpt.resume()
    for step in (100, 137):  # 137: an emergency checkpoint off the 50-step interval
        job.step()
        assert job.ckpt.save_at(step, 0, blocking=True)
    catalog = job.ckpt.catalog
    monkeypatch.setattr(catalog, "write_pointer", lambda step: (_ for _ in ()).throw(OSError("lost")))
    job.step()
    assert job.ckpt.save_at(150, 0, blocking=True)  # committed; its pointer write failed
    assert json.loads(catalog.storage.read_bytes(POINTER))["step"] == 137
    expected = job.weights()
    fresh = Job(any_url, "checkpoint.every_steps=50", seed=3)
    assert fresh.ckpt.resume() == 150
    assert all(torch.equal(v, expected[k]) for k, v in fresh.weights().items())


@pytest.mark.timeout(60)
def test_the_pointer_never_moves_backwards(any_url):
    job = Job(any_url)
    job.ckpt.resume()
    _train(job, 2)
    catalog = job.ckpt.catalog
    assert catalog.write_pointer(2)
    assert not catalog.write_pointer(1)
    assert catalog.pointer_step() == 2


@pytest.mark.timeout(60)
def test_a_zombie_writer_cannot_commit_move_the_pointer_or_delete(any_url):
    """A writer of an older incarnation, held up mid-save while a newer start resumes and
    commits, is fenced off: its save fails and the newer start's commits stay as they are."""
    zombie = Job(any_url, "checkpoint.keep_last=2")
    zombie.ckpt.resume()
    _train(zombie, 1)
    gate, reached = threading.Event(), threading.Event()
    real_write_manifest = zombie.ckpt.catalog.write_manifest

    def held_up(manifest):  # paused just before its manifest write, as a SIGSTOPped process
        reached.set()
        assert gate.wait(30)
        return real_write_manifest(manifest)

    zombie.ckpt.catalog.write_manifest = held_up
    zombie.step()
    zombie.ckpt.save_at(2, 0, blocking=False)
    assert reached.wait(30)

    newer = Job(any_url, "checkpoint.keep_last=2", seed=4)
    assert newer.ckpt.resume() == 1
    _train(newer, 3)  # commits 2, 3, 4 (and retention deletes older ones)
    newer.ckpt.drain()
    after_newer = _files(any_url)
    pointer = newer.ckpt.catalog.pointer_step()

    gate.set()
    with pytest.raises(FencedError):  # fenced: not committed, and the writer learns why
        zombie.ckpt.wait()
    with pytest.raises(FencedError):
        zombie.ckpt.catalog.delete(4)
    with pytest.raises(FencedError):
        zombie.ckpt.catalog.write_pointer(99)
    zombie.ckpt.drain()
    assert newer.ckpt.catalog.pointer_step() == pointer == 4
    assert _files(any_url) == after_newer  # no file of the newer start touched
    assert Catalog(open_storage(any_url)).verify(4) == []


@pytest.mark.timeout(60)
def test_incarnations_only_grow_and_are_unique(any_url):
    numbers = []
    for _ in range(3):
        job = Job(any_url)
        job.ckpt.resume()
        numbers.append(job.ckpt.ownership.number)
    assert numbers == sorted(set(numbers)) and numbers[0] >= 1


@pytest.mark.timeout(60)
def test_every_byte_is_in_the_file_when_it_is_fsynced(tmp_path, monkeypatch):
    """DCP fsyncs each file it writes; the bytes must be in the file at that moment (not in
    a user-space buffer), or a power loss would leave the newest commit failing its CRC."""
    synced: dict[str, int] = {}
    real_fsync = os.fsync

    def recording_fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced[os.path.basename(path).removesuffix(".tmp")] = os.fstat(fd).st_size  # .metadata is renamed
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    # A small state: its .metadata fits in one write buffer, so unflushed bytes would show.
    from service.checkpoint.manager import Checkpointer
    from service.config import load_config
    from service.dist import DistInfo
    from service.train.state import TrainState

    cfg = load_config(None, [f'checkpoint.url="{tmp_path}"'])
    ckpt = Checkpointer(cfg, DistInfo(0, 1, 0, torch.device("cpu"), "0"), {"train_state": TrainState(step=1)},
                        per_rank_keys=(), can_read_state=lambda: True)
    assert ckpt.save_at(1, 0, blocking=True)
    ckpt.close()
    manifest = ckpt.catalog.manifest(1)
    assert manifest.files[".metadata"].size < 4096
    assert ".metadata" in synced and any(n.endswith(".distcp") for n in synced)
    for name, entry in manifest.files.items():
        assert synced.get(name) == entry.size, name


@pytest.mark.timeout(60)
def test_a_refused_start_stays_refused_on_its_restarts_and_claims_nothing(url):
    """torchrun retries a worker that exited 2: the retry is not a restart of a run that owns
    the root, so it is refused again — and never takes the root over."""
    first = Job(url, run_id="run-1")
    first.ckpt.resume()
    _train(first, 2)
    records = Ownership(open_storage(url)).records()
    for attempt in range(3):
        retry = Job(url, 'checkpoint.resume="never"', run_id="run-2", restart_count=attempt)
        with pytest.raises(UserError, match="never"):
            retry.ckpt.resume()
    assert Ownership(open_storage(url)).records() == records
    _train(first, 1)  # the owner is undisturbed
    assert first.ckpt.catalog.latest()[0] == 3


@pytest.mark.timeout(60)
def test_pinning_the_own_root_is_checked_as_the_own_history(url):
    job = Job(url)
    job.ckpt.resume()
    _train(job, 2)
    for same in (url, f"{url}/", f"{url}/{step_dir(2)}"):
        with pytest.raises(UserError, match="run.seed"):
            Job(url, "run.seed=4", f'checkpoint.resume="{same}"').ckpt.resume()
    if "://" not in url:  # a path and its file:// form are one root
        assert Job(url, f'checkpoint.resume="file://{url}/{step_dir(2)}"').ckpt.resume() == 2


@pytest.mark.timeout(60)
def test_a_restart_before_the_first_commit_starts_from_the_pinned_source_again(url):
    source = f"memory://src-{uuid.uuid4().hex[:6]}"
    origin = Job(source)
    _train(origin, 2)
    expected = origin.weights()
    first = Job(url, f'checkpoint.resume="{source}/{step_dir(2)}"', run_id="run-P")
    assert first.ckpt.resume() == 2  # ... and crashes before committing anything
    again = Job(url, f'checkpoint.resume="{source}/{step_dir(2)}"', run_id="run-P", restart_count=1, seed=8)
    assert again.ckpt.resume() == 2
    assert all(torch.equal(v, expected[k]) for k, v in again.weights().items())


@pytest.mark.timeout(60)
def test_never_refuses_a_root_another_run_claimed_before_its_first_commit(url):
    starting = Job(url, run_id="run-1")
    starting.ckpt.resume()  # claimed, not committed yet
    with pytest.raises(UserError, match="claimed by another run"):
        Job(url, 'checkpoint.resume="never"', run_id="run-2").ckpt.resume()


@pytest.mark.timeout(60)
def test_a_superseded_run_does_not_take_the_root_back(url):
    old = Job(url, run_id="run-old")
    old.ckpt.resume()
    _train(old, 1)
    new = Job(url, run_id="run-new")
    assert new.ckpt.resume() == 1
    with pytest.raises(FencedError):
        _train(old, 1)
    with pytest.raises(UserError, match="superseded"):
        Job(url, run_id="run-old", restart_count=1).ckpt.resume()
    _train(new, 1)
    assert new.ckpt.catalog.latest()[0] == 2


@pytest.mark.timeout(60)
def test_deleted_incarnation_records_never_hand_out_a_number_twice(url):
    job = Job(url)
    job.ckpt.resume()
    _train(job, 2)
    used = job.ckpt.ownership.number
    job.ckpt.close()
    storage = open_storage(url)
    for name in storage.list_dir("incarnations"):
        storage.remove(f"incarnations/{name}")
    shard = shard_name(job.ckpt.catalog, 2)
    storage.write_bytes(f"{step_dir(2)}/{shard}", b"corrupt")  # step 2 becomes unloadable
    again = Job(url)
    assert again.ckpt.resume() == 1
    assert again.ckpt.ownership.number > used
    again.step()
    assert again.ckpt.save_at(2, 0, blocking=True)  # rewritten, not taken as "already committed"
    assert Catalog(storage).verify(2) == []


@pytest.mark.timeout(60)
def test_older_manifests_are_compared_by_their_recorded_config(url):
    job = Job(url)
    job.ckpt.resume()
    _train(job, 1)
    storage = open_storage(url)
    body = json.loads(storage.read_bytes(f"{step_dir(1)}/manifest.json"))
    for key in ("fingerprint", "run_id", "incarnation"):
        body.pop(key, None)
    body["config"]["train"]["loss_scale"] = 1.0  # a key an older release had
    storage.write_bytes_atomic(f"{step_dir(1)}/manifest.json", json.dumps(body).encode())
    with pytest.raises(UserError, match="run.seed"):
        Job(url, "run.seed=7").ckpt.resume()
    assert Job(url).ckpt.resume() == 1


@pytest.mark.timeout(60)
def test_a_pinned_source_without_commits_is_an_error_not_a_fresh_start(url):
    with pytest.raises(UserError, match="no committed checkpoint"):
        Job(url, 'checkpoint.resume="memory://typo-of-a-root"').ckpt.resume()


@pytest.mark.timeout(60)
def test_two_fresh_runs_claiming_one_root_at_once_both_refuse(url):
    a = Job(url, 'checkpoint.resume="never"', run_id="run-a")
    b = Job(url, 'checkpoint.resume="never"', run_id="run-b")
    # Both checked the empty root before either claimed it (the race): simulate by claiming b
    # between a's check and a's claim.
    real_claim = a.ckpt._claim

    def claim_after_b() -> None:
        b.ckpt.ownership.claim("run-b")
        real_claim()

    a.ckpt._claim = claim_after_b
    with pytest.raises(UserError, match="same moment"):
        a.ckpt.resume()


@pytest.mark.timeout(60)
def test_a_stray_file_named_like_a_step_folder_is_not_a_checkpoint(tmp_path):
    job = Job(str(tmp_path))
    job.ckpt.resume()
    _train(job, 1)
    (tmp_path / step_dir(7)).write_text("junk")
    assert Catalog(open_storage(str(tmp_path))).latest()[0] == 1
    assert Job(str(tmp_path), seed=2).ckpt.resume() == 1


@pytest.mark.timeout(60)
def test_verify_and_resume_refuse_metadata_naming_unlisted_files(tmp_path):
    """A hostile bucket rewrites .metadata (and the manifest's CRC of it) to point at a file
    the manifest does not list: verify reports it, a resume falls back past it."""
    import crc32c

    from service.checkpoint.safe_pickle import load_metadata

    job = Job(str(tmp_path))
    job.ckpt.resume()
    _train(job, 2)
    storage = open_storage(str(tmp_path))
    folder = step_dir(2)
    metadata = load_metadata(storage.read_bytes(f"{folder}/.metadata"), "m")
    shard = shard_name(Catalog(storage), 2)
    (tmp_path / folder / "__0_evil_0.distcp").write_bytes((tmp_path / folder / shard).read_bytes())
    for info in metadata.storage_data.values():
        info.relative_path = "__0_evil_0.distcp"
    import pickle

    data = pickle.dumps(metadata)
    storage.write_bytes_atomic(f"{folder}/.metadata", data)
    body = json.loads(storage.read_bytes(f"{folder}/manifest.json"))
    body["files"][".metadata"] = {"size": len(data), "crc32c": f"{crc32c.crc32c(data):08x}"}
    storage.write_bytes_atomic(f"{folder}/manifest.json", json.dumps(body).encode())
    assert any("does not list" in p for p in Catalog(storage).verify(2))
    assert Job(str(tmp_path), seed=3).ckpt.resume() == 1


@pytest.mark.timeout(30)
def test_a_claim_that_hits_a_full_disk_leaves_no_empty_record(tmp_path, monkeypatch):
    """A create-only write that fails half-way (ENOSPC) removes what it created: an empty
    incarnation record would belong to nobody, and every later start would take it for a
    newer owner of the root and stop as superseded."""
    import errno

    from service.checkpoint.backends import local as storage_mod

    root = open_storage(str(tmp_path / "root"))
    real_write = os.write

    def full(fd, data):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage_mod.os, "write", full)
    with pytest.raises(OSError):
        Ownership(root).claim("run-a")
    monkeypatch.setattr(storage_mod.os, "write", real_write)
    assert Ownership(root).records() == []
    assert Ownership(root).claim("run-a") == 1  # the number was never taken
