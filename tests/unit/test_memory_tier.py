"""The node-local memory tier (service/checkpoint/memory_tier.py, memory_recovery.py): the state
of a completed step left in shared memory round-trips bitwise; torn, corrupt, foreign, stale and
other-world-size snapshots are never used (with the reason logged and counted); a crafted
pickle is refused, not run; at most two files per run and node; nothing is left while an update
is half applied; and the Checkpointer resumes from it on a restart of the same run."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from service.checkpoint.context import CheckpointContext
from service.checkpoint.memory_recovery import MemoryRecovery
from service.checkpoint.memory_tier import (
    KEEP,
    MAGIC,
    REJECT_REASONS,
    TRAILER,
    Header,
    MemoryTier,
    default_dir,
    encode_file,
)
from service.config import TrainConfig, load_config
from service.dist import DistInfo
from service.metrics import MEMORY_REJECT_REASONS, CheckpointMetrics
from service.models.ema import EMAState, build_ema
from service.state_keys import PER_RANK_KEYS
from service.train.state import (
    DataState,
    GradScalerState,
    LRSchedulerState,
    ModelState,
    OptimizerState,
    RNGState,
    TrainState,
    build_registry,
    warmup_cosine,
)

REPO = Path(__file__).resolve().parents[2]
RUN = "run-a"
FP = {"run.seed": 0, "train.lr": 0.01, "train.max_steps": 10}
CPU = torch.device("cpu")


class Job:
    """A small registry with every kind of state the trainer has (model, EMA, AdamW, LambdaLR,
    grad scaler, counters, data position, per-rank RNG), trained deterministically."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.GroupNorm(2, 8), nn.Linear(8, 2))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.01)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine(2, 10, 0.1))
        self.ema = build_ema(self.model, TrainConfig())
        self.train, self.data = TrainState(), DataState()
        self.registry = build_registry(
            model=ModelState(self.model), ema=EMAState(self.ema, self.model),
            optimizer=OptimizerState(self.model, self.opt), lr_scheduler=LRSchedulerState(self.sched),
            grad_scaler=GradScalerState(torch.amp.GradScaler("cpu", enabled=False)),
            train_state=self.train, data=self.data, rng=RNGState(0, CPU),
        )

    def step(self, before_update=lambda: None) -> None:  # type: ignore[no-untyped-def]
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(self.train.step))
        self.model(x).square().mean().backward()
        before_update()
        self.opt.step()
        self.opt.zero_grad()
        self.sched.step()
        self.ema.step(self.model.parameters())
        self.train.step += 1
        self.train.samples_seen += 8
        self.data.position += 8

    def snapshot(self) -> dict[str, Any]:
        import copy

        return {k: copy.deepcopy(v.state_dict()) for k, v in self.registry.items() if k not in PER_RANK_KEYS}


def recovery(job: Job, directory: Path, *, run_id: str = RUN, fp: dict | None = None, world_size: int = 1,
             incarnation: int | None = 1, metrics: CheckpointMetrics | None = None, rank: int = 0
             ) -> MemoryRecovery:
    info = DistInfo(rank, world_size, rank, CPU, str(rank), run_id)
    cfg = load_config(None, [f'checkpoint.url="memory://memory-tier-tests-{run_id}"'])
    ctx = CheckpointContext.open(cfg, info, job.registry, metrics, PER_RANK_KEYS, fp if fp is not None else FP)
    return MemoryRecovery(ctx, MemoryTier(run_id, directory), lambda: incarnation, lambda: bool(job.opt.state))


def left_at(tmp_path: Path, steps: int = 3, **kw: Any) -> tuple[Job, Path]:
    job = Job()
    for _ in range(steps):
        job.step()
    rec = recovery(job, tmp_path, **kw)
    rec.consistent_at(job.train.step)
    assert rec.leave("test")
    return job, MemoryTier(kw.get("run_id", RUN), tmp_path).path(steps)


def assert_bitwise(a: Any, b: Any, where: str = "") -> None:
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_bitwise(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and a == b, (where, a, b)  # ints stay ints, floats exact


def rejected(metrics: CheckpointMetrics, reason: str) -> float:
    return metrics.memory_snapshots_rejected.labels(reason=reason)._value.get()


# -- round trip ----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_round_trip_is_bitwise_and_training_continues_identically(tmp_path):
    job, path = left_at(tmp_path)
    assert path.exists() and path.stat().st_mode & 0o777 == 0o600
    other = Job(seed=1)  # other weights: everything must come from the file
    assert recovery(other, tmp_path).resume(None) == 3
    assert_bitwise(other.snapshot(), job.snapshot())
    assert other.train == job.train and other.data == job.data
    for _ in range(3):  # the LR schedule, AdamW moments and EMA carry on exactly
        job.step()
        other.step()
    assert_bitwise(other.snapshot(), job.snapshot())


@pytest.mark.timeout(60)
def test_a_start_at_another_world_size_takes_the_snapshot_too(tmp_path):
    """A job that lost a node and shrank (or grew back) goes on from the survivors' step: the
    state kept is the same on every rank and independent of the world size."""
    job, _ = left_at(tmp_path, world_size=4)
    other = Job(seed=1)
    metrics = CheckpointMetrics(CollectorRegistry())
    assert recovery(other, tmp_path, world_size=2, metrics=metrics).resume(None) == 3
    assert_bitwise(other.snapshot(), job.snapshot())
    assert sum(rejected(metrics, r) for r in ("corrupt", "foreign", "stale")) == 0


@pytest.mark.timeout(60)
def test_the_newest_usable_step_wins_and_a_commit_above_it_makes_it_stale(tmp_path):
    job = Job()
    rec = recovery(job, tmp_path)
    for _ in range(4):
        job.step()
        rec.consistent_at(job.train.step)
        rec.leave("test")
    assert MemoryTier(RUN, tmp_path).steps() == [4, 3]  # at most KEEP files per run and node
    assert KEEP == 2
    assert recovery(Job(1), tmp_path).resume((2, 1)) == 4
    metrics = CheckpointMetrics(CollectorRegistry())
    assert recovery(Job(1), tmp_path, metrics=metrics).resume((4, 1)) is None
    assert rejected(metrics, "stale") == 2


# -- what is never used ------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _flip_payload(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(MAGIC) + 1000] ^= 0x01
    path.write_bytes(bytes(data))


def _flip_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-TRAILER.size - 20] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how,reason,kw", [
    ("truncated", "corrupt", {}),
    ("flipped payload byte", "corrupt", {}),
    ("flipped header byte", "corrupt", {}),
    ("a header field of the wrong type, checksummed", "corrupt", {}),
    ("other run id", "foreign", {"run_id": "run-b"}),
    ("other fingerprint", "foreign", {"fp": {**FP, "run.seed": 1}}),
    ("stale: committed at the same step", "stale", {"committed": (3, 1)}),
    ("stale: an older incarnation than the newest commit's", "stale", {"committed": (2, 2)}),
])
def test_bad_snapshots_are_ignored_with_the_reason(tmp_path, caplog, how, reason, kw):
    _, path = left_at(tmp_path)
    if how == "truncated":
        _truncate(path)
    elif how == "flipped payload byte":
        _flip_payload(path)
    elif how == "flipped header byte":
        _flip_header(path)
    elif how.startswith("a header field"):
        _rewrite(path, header={"incarnation": "7"})
    elif how == "other run id":  # a file under this run's name whose header names another run
        left_at(tmp_path / "b", run_id="run-b")
        os.replace(MemoryTier("run-b", tmp_path / "b").path(3), path)
    metrics = CheckpointMetrics(CollectorRegistry())
    other = Job(seed=1)
    before = other.snapshot()
    opts = {k: v for k, v in kw.items() if k in ("fp", "world_size")}
    with caplog.at_level(logging.WARNING):
        assert recovery(other, tmp_path, metrics=metrics, **opts).resume(kw.get("committed")) is None
    assert_bitwise(other.snapshot(), before)  # nothing was loaded
    assert rejected(metrics, reason) == 1
    assert "not using" in caplog.text and reason in caplog.text
    assert path.exists() == (reason != "corrupt")  # a corrupt file is removed, others are left


@pytest.mark.timeout(60)
def test_a_crafted_pickle_is_refused_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {marker}",))

    tier = MemoryTier(RUN, tmp_path)
    header = Header(run_id=RUN, incarnation=1, fingerprint=FP, step=5, world_size=1, rank=0)
    tier.dir.mkdir(exist_ok=True)
    encode_file(tier.path(5), header, {"model": Boom()})  # valid header, valid checksums
    # and a raw (non-zip) pickle as the payload of another step, checksummed as well
    raw = tier.path(6)
    encode_file(raw, Header(**{**header.__dict__, "step": 6}), {})
    body = pickle.dumps(Boom())
    _replace_payload(raw, body)
    metrics = CheckpointMetrics(CollectorRegistry())
    assert recovery(Job(1), tmp_path, metrics=metrics).resume(None) is None
    assert not marker.exists()
    assert rejected(metrics, "corrupt") == 2


def _replace_payload(path: Path, payload: bytes) -> None:
    """Rewrite a snapshot file around another payload, with matching checksums (an attacker
    who can write the file can also compute them)."""
    _rewrite(path, payload)


def _rewrite(path: Path, payload: bytes | None = None, header: dict | None = None) -> None:
    import json

    import crc32c

    data = path.read_bytes()
    length, _, _ = TRAILER.unpack(data[-TRAILER.size:])
    body = json.loads(data[-TRAILER.size - length:-TRAILER.size])
    if payload is None:
        payload = data[len(MAGIC):-TRAILER.size - length]
    body.update(payload_length=len(payload), payload_crc32c=crc32c.crc32c(payload), **(header or {}))
    header = body
    blob = json.dumps(header).encode()
    path.write_bytes(MAGIC + payload + blob + TRAILER.pack(len(blob), crc32c.crc32c(blob), MAGIC))


# -- when a snapshot is (not) left ----------------------------------------------------------------
@pytest.mark.timeout(60)
def test_nothing_is_left_mid_update_for_committed_steps_or_twice(tmp_path):
    job = Job()
    rec = recovery(job, tmp_path)
    job.step()
    rec.consistent_at(1)
    rec.updating()  # the update of step 2 has begun: half applied, never saved
    assert not rec.leave("test")
    job.step()
    rec.consistent_at(2)
    rec.committed(2)
    assert not rec.leave("test")  # in the object store already
    job.step()
    rec.consistent_at(3)
    assert rec.leave("test") and not rec.leave("again")
    assert MemoryTier(RUN, tmp_path).steps() == [3]
    # A peer on the same node leaving the same step finds it there and writes nothing.
    peer = recovery(job, tmp_path)
    peer.consistent_at(3)
    assert not peer.leave("peer")
    rec.committed(3, run_finished=True)
    assert list(tmp_path.iterdir()) == []  # removed when the run is over


@pytest.mark.timeout(60)
def test_a_writer_blocks_the_next_update_until_it_is_done(tmp_path):
    """The lock: a thread leaving the state (the signal watcher) and the main thread starting
    an update never overlap, so the file holds exactly one step."""
    import threading

    job = Job()
    rec = recovery(job, tmp_path)
    job.step()
    rec.consistent_at(1)
    expected = job.snapshot()
    slow = threading.Event()
    original = rec.tier.write

    def slow_write(header, state):  # type: ignore[no-untyped-def]
        slow.set()
        time.sleep(0.5)
        return original(header, state)

    rec.tier.write = slow_write  # type: ignore[method-assign]
    writer = threading.Thread(target=rec.leave, args=("signal",))
    writer.start()
    slow.wait(5)
    t0 = time.monotonic()
    job.step(before_update=rec.updating)  # must wait for the writer before changing anything
    assert time.monotonic() - t0 > 0.3
    writer.join()
    other = Job(1)
    assert recovery(other, tmp_path).resume(None) == 1
    assert_bitwise(other.snapshot(), expected)


def test_default_dir_is_per_user_shared_memory_and_reasons_match_the_metric():
    d = default_dir()
    assert d.name == f"ftdiff-memory-{os.getuid()}"
    if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK):
        assert d.parent == Path("/dev/shm")
    assert tuple(REJECT_REASONS) == tuple(MEMORY_REJECT_REASONS)


# -- two ranks on two "nodes": agree on the newest step, broadcast from its holder ---------------
def _two_ranks(rank: int, port: int, dirs: dict[str, list[str]], out: str) -> None:
    import json

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    report = {}
    for scenario, per_rank in dirs.items():
        job, metrics = Job(seed=10 + rank), CheckpointMetrics(CollectorRegistry())
        step = recovery(job, Path(per_rank[rank]), world_size=2, rank=rank, metrics=metrics).resume((4, 1))
        report[scenario] = {"step": step, "train": job.train.step, "weight": job.model[0].weight.sum().item(),
                            "corrupt": rejected(metrics, "corrupt")}
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_two_ranks_take_the_newest_step_from_whichever_rank_holds_it(tmp_path):
    import json

    import torch.multiprocessing as mp

    from service.supervisor.torchrun import free_port

    def leave(job: Job, where: Path) -> None:
        rec = recovery(job, where, world_size=2)
        rec.consistent_at(job.train.step)
        assert rec.leave("test")

    job, weights = Job(), {}
    d = {name: [tmp_path / f"{name}-node{r}" for r in (0, 1)] for name in ("newest", "bad", "none")}
    for _ in range(5):
        job.step()
    leave(job, d["newest"][0])
    leave(job, d["bad"][0])
    weights[5] = job.model[0].weight.sum().item()
    for _ in range(2):
        job.step()
    leave(job, d["newest"][1])
    leave(job, d["bad"][1])
    weights[7] = job.model[0].weight.sum().item()
    _flip_payload(MemoryTier(RUN, d["bad"][1]).path(7))  # header intact: only its holder finds out
    mp.spawn(_two_ranks, args=(free_port(), {k: [str(p) for p in v] for k, v in d.items()}, str(tmp_path)),
             nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, report in enumerate(reports):
        assert report["newest"]["step"] == 7 and report["newest"]["train"] == 7  # from rank 1
        assert report["newest"]["weight"] == weights[7]
        assert report["bad"]["step"] == 5 and report["bad"]["weight"] == weights[5]  # next round: rank 0's
        assert report["bad"]["corrupt"] == (1 if r == 1 else 0)
        assert report["none"]["step"] is None and report["none"]["train"] == 0
    assert not MemoryTier(RUN, d["bad"][1]).path(7).exists()  # the bad file is gone


# -- a stop signal leaves the state even while the main thread is blocked ------------------------
# A process at step 2 whose main thread never returns to the loop (as if stuck in a collective).
STUCK_AT_STEP_2 = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from tests.unit.test_memory_tier import Job, recovery
from pathlib import Path
job = Job()
job.step(); job.step()
rec = recovery(job, Path({dir!r}))
rec.consistent_at(2)
"""
WATCHER = STUCK_AT_STEP_2 + """
stopped = []
signal.signal(signal.SIGTERM, lambda *a: stopped.append(1))  # like the trainer: a flag only
rec.watch_signals()
print("ready", flush=True)
time.sleep(60)  # the main thread never looks at the flag
"""
ORDERED_OUT = STUCK_AT_STEP_2 + """
rec.watch_signals(then={{signal.SIGUSR1: lambda: os._exit(44)}})  # like the trainer's exit on an order
signal.signal(signal.SIGUSR1, lambda *a: None)
print("ready", flush=True)
time.sleep(60)  # only the watcher thread can act
"""


def _stuck_process(script: str, tmp_path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", script.format(repo=str(REPO), dir=str(tmp_path))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def _assert_a_restart_takes_back_step_2(tmp_path: Path) -> None:
    job = Job()
    job.step()
    job.step()
    other = Job(1)
    assert recovery(other, tmp_path).resume(None) == 2
    assert_bitwise(other.snapshot(), job.snapshot())


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_sigterm_leaves_the_state_from_the_watcher_thread(tmp_path):
    proc = _stuck_process(WATCHER, tmp_path)
    try:
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while MemoryTier(RUN, tmp_path).steps() != [2]:
            assert time.monotonic() < deadline, "no snapshot after SIGTERM"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait(10)
    _assert_a_restart_takes_back_step_2(tmp_path)


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_the_leave_order_signal_leaves_the_state_then_exits(tmp_path):
    proc = _stuck_process(ORDERED_OUT, tmp_path)
    try:
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(20) == 44, proc.stderr.read()  # left by itself, main thread still asleep
    finally:
        proc.kill()
        proc.wait(10)
    assert MemoryTier(RUN, tmp_path).steps() == [2]  # and the state was left before the exit
    _assert_a_restart_takes_back_step_2(tmp_path)


# -- through the Checkpointer: a restart of the same run ------------------------------------------
class CkptJob(Job):
    def __init__(self, url: Path, shm: Path, *overrides: str, seed: int = 0, run_id: str = RUN):
        from service.checkpoint.manager import Checkpointer

        super().__init__(seed)
        cfg = load_config(None, [f'checkpoint.url="{url}"', f'checkpoint.memory_tier_dir="{shm}"',
                                 "checkpoint.async=false", *overrides])
        self.metrics = CheckpointMetrics(CollectorRegistry())
        self.ckpt = Checkpointer(cfg, DistInfo(0, 1, 0, CPU, "0", run_id), self.registry, self.metrics,
                                 per_rank_keys=PER_RANK_KEYS, can_read_state=lambda: bool(self.opt.state),
                                 fingerprint=FP)

    def train_to(self, last: int, final: int | None = None) -> None:
        while self.train.step < last:
            self.step(before_update=self.ckpt.before_update)
            self.ckpt.update_done(self.train.step)
            self.ckpt.save(self.train.step, self.train.samples_seen, last_step=self.train.step == final)

    def source(self) -> str:
        states = self.metrics.recovery_source._states
        return next(s for s in states if self.metrics.recovery_source._value == states.index(s))


@pytest.mark.timeout(60)
def test_checkpointer_restart_resumes_from_memory_then_the_run_cleans_up(tmp_path):
    url, shm = tmp_path / "ckpt", tmp_path / "shm"
    first = CkptJob(url, shm, "checkpoint.every_steps=4")
    assert first.ckpt.resume() is None and first.source() == "fresh"
    first.train_to(6)  # commit at 4, then "a peer dies" at 6
    first.ckpt.close()  # the way out: leaves step 6
    assert MemoryTier(RUN, shm).steps() == [6]

    again = CkptJob(url, shm, "checkpoint.every_steps=4", seed=1)
    assert again.ckpt.resume() == 6
    assert again.source() == "memory"
    assert again.metrics.memory_steps_recovered._value.get() == 2
    assert again.ckpt.last_committed_step == 4  # the object store's newest commit, unchanged
    assert_bitwise(again.snapshot(), first.snapshot())
    again.train_to(10, final=10)  # commits 8 (prunes the snapshot) and the final 10
    again.ckpt.close()
    assert not shm.exists() or list(shm.iterdir()) == []

    reference = CkptJob(tmp_path / "ref", tmp_path / "shm-ref", "checkpoint.every_steps=4", run_id="ref")
    reference.ckpt.resume()
    reference.train_to(10, final=10)
    reference.ckpt.close()
    assert_bitwise(again.snapshot(), reference.snapshot())


@pytest.mark.timeout(60)
def test_checkpointer_corrupt_snapshot_resumes_from_the_object_store(tmp_path):
    url, shm = tmp_path / "ckpt", tmp_path / "shm"
    first = CkptJob(url, shm, "checkpoint.every_steps=4")
    first.ckpt.resume()
    first.train_to(6)
    at_4 = CkptJob(tmp_path / "x", tmp_path / "y", run_id="x")  # the state at the commit, for comparison
    at_4.train_to(4)
    first.ckpt.close()
    _flip_payload(MemoryTier(RUN, shm).path(6))
    again = CkptJob(url, shm, "checkpoint.every_steps=4", seed=1)
    assert again.ckpt.resume() == 4
    assert again.source() == "object_store"
    assert again.metrics.memory_snapshots_rejected.labels(reason="corrupt")._value.get() == 1
    assert_bitwise(again.snapshot(), at_4.snapshot())
    for j in (again, at_4):
        j.ckpt.close()


@pytest.mark.timeout(60)
def test_checkpointer_with_memory_tier_off_leaves_and_takes_nothing(tmp_path):
    url, shm = tmp_path / "ckpt", tmp_path / "shm"
    first = CkptJob(url, shm, "checkpoint.every_steps=4", "checkpoint.memory_tier=false")
    first.ckpt.resume()
    first.train_to(6)
    first.ckpt.close()
    assert not shm.exists()
    # Even a valid snapshot there is not taken when the tier is off.
    on = CkptJob(tmp_path / "other", shm, "checkpoint.every_steps=100")
    on.ckpt.resume()
    on.train_to(6)
    on.ckpt.close()
    off = CkptJob(tmp_path / "other", shm, "checkpoint.every_steps=100", "checkpoint.memory_tier=false",
                  seed=1)
    assert off.ckpt.resume() is None and off.source() == "fresh"
    off.ckpt.close()


def test_a_first_start_never_takes_state_from_memory(tmp_path):
    """Only a restart of the same run (an incarnation record with its run id) looks there."""
    shm = tmp_path / "shm"
    left_at(shm, steps=3)
    fresh = CkptJob(tmp_path / "ckpt", shm, "checkpoint.every_steps=100")
    assert fresh.ckpt.resume() is None and fresh.source() == "fresh"
    fresh.ckpt.close()


def test_a_directory_others_can_write_is_not_used(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    job, _ = left_at(shared)
    shared.chmod(0o777)  # anyone could swap the files: neither written to nor read from
    other = Job(1)
    assert recovery(other, shared).resume(None) is None
    job.step()
    rec = recovery(job, shared)
    rec.consistent_at(job.train.step)
    assert not rec.leave("test")


def test_the_switch_is_not_a_math_key_and_keeps_old_config_hashes():
    from service.checkpoint.identity import fingerprint

    default = load_config(None)
    assert load_config(None, ["checkpoint.memory_tier=true"]).hash() == default.hash()
    assert load_config(None, ["checkpoint.memory_tier=false"]).hash() != default.hash()
    assert fingerprint(default) == fingerprint(load_config(None, ["checkpoint.memory_tier=false",
                                                                  'checkpoint.memory_tier_dir="/x"']))


def test_left_over_files_of_any_run_go_after_a_day(tmp_path):
    _, old = left_at(tmp_path, run_id="abandoned")
    day_ago = time.time() - 25 * 3600
    os.utime(old, (day_ago, day_ago))
    _, recent = left_at(tmp_path, run_id="recent")
    job = Job()
    job.step()
    rec = recovery(job, tmp_path)
    rec.consistent_at(1)
    assert rec.leave("test")  # a writer sweeps
    assert not old.exists() and recent.exists()


@pytest.mark.timeout(60)
def test_periodic_snapshots_cover_a_node_whose_processes_all_died_at_once(tmp_path):
    """Nobody is left to leave the state on the way out (the process is abandoned, as by a
    kill -9 of the whole node): the restart takes the newest periodic snapshot."""
    url, shm = tmp_path / "ckpt", tmp_path / "shm"
    periodic = ("checkpoint.every_steps=100", "checkpoint.memory_every_steps=3")
    first = CkptJob(url, shm, *periodic)
    first.ckpt.resume()
    first.train_to(7)  # snapshots at 3 and 6, taken before the next update began; then "killed"
    assert MemoryTier(RUN, shm).steps() == [6, 3]
    at_6 = CkptJob(tmp_path / "x", tmp_path / "y", run_id="x")
    at_6.train_to(6)

    again = CkptJob(url, shm, *periodic, seed=1)
    assert again.ckpt.resume() == 6 and again.source() == "memory"  # one step lost, not seven
    assert_bitwise(again.snapshot(), at_6.snapshot())
    for job in (again, at_6):
        job.ckpt.close()

    off = CkptJob(tmp_path / "off", tmp_path / "shm-off", "checkpoint.every_steps=100", run_id="off")
    off.ckpt.resume()
    off.train_to(7)
    assert MemoryTier("off", tmp_path / "shm-off").steps() == []  # 0: only on the way out
    off.ckpt.close()


@pytest.mark.timeout(30)
def test_the_local_supervisor_removes_its_runs_snapshots_at_the_end(tmp_path):
    """`ftdiff train` names each run after itself: once its workers are gone, nobody can take
    its snapshots, so they go (not after a day); another run's stay."""
    from service.checkpoint.memory_tier import run_key
    from service.supervisor.ending import remove_run_files

    left_at(tmp_path)
    other, _ = left_at(tmp_path, run_id="other-run")
    for run in (RUN, "other-run"):  # the progress records kept beside them (service.train.restart_cost)
        (tmp_path / f"ftdiff-{run_key(run)}-progress-000000.mem").write_bytes(b"x" * 28)
    assert MemoryTier(RUN, tmp_path).steps() == [3] and MemoryTier("other-run", tmp_path).steps() == [3]
    remove_run_files(load_config(None, [f'checkpoint.memory_tier_dir="{tmp_path}"']), RUN)
    assert MemoryTier(RUN, tmp_path).steps() == [] and MemoryTier("other-run", tmp_path).steps() == [3]
    assert [p.name for p in tmp_path.glob("*progress*")] == [f"ftdiff-{run_key('other-run')}-progress-000000.mem"]
