"""What failures cost: the workers' progress records (torn, foreign, stale ones ignored), the
report of one restart, the supervisor counting it once, and goodput over a window."""

from __future__ import annotations

import json
import math
import os
import time

import pytest
from prometheus_client import generate_latest

from service.heartbeat import Heartbeat
from service.metrics import SupervisorMetrics
from service.supervisor.failure_cost import FailureCostBook
from service.train.restart_cost import ORDERED, STOPPED, LastStep, RestartCostMeter, StepRecord, combine

pytestmark = pytest.mark.timeout(30)


def hb(rank: int = 0, step: int = 1, phase: str = "training", pid: int = 100, recovery=None) -> Heartbeat:
    return Heartbeat(rank=rank, local_rank=rank, node="n0", pid=pid, world_size=2, step=step, phase=phase,
                     last_committed_step=None, restart_count=0, time=0.0, started=1.0, recovery=recovery)


def test_records_survive_the_process_and_a_torn_or_foreign_record_is_skipped(tmp_path):
    a, b = StepRecord(tmp_path, "run-1", 0), StepRecord(tmp_path, "run-1", 1)
    a.mark(7)
    b.mark(8)
    b.left(ORDERED)
    StepRecord(tmp_path, "another-run", 0).mark(99)  # never read for run-1
    a.close()
    b.close()  # as after kill -9: the file keeps the last write
    newest = StepRecord(tmp_path, "run-1", 5).read_node()
    assert newest is not None and newest.step == 8 and newest.ordered and newest.kind(2) == "hang"
    data = bytearray(b.path.read_bytes())
    data[0] ^= 1  # torn or tampered: its checksum no longer matches
    b.path.write_bytes(bytes(data))
    newest = StepRecord(tmp_path, "run-1", 5).read_node()
    assert newest is not None and newest.step == 7 and not newest.ordered and newest.kind(2) == "crash"
    StepRecord(tmp_path, "run-1", 0).clear_node()
    assert StepRecord(tmp_path, "run-1", 0).read_node() is None
    assert StepRecord(tmp_path, "another-run", 0).read_node().step == 99


def test_kinds_from_how_processes_left():
    crash = combine([LastStep(5, 1.0), None, LastStep(6, 2.0, all_stopped=True)])
    assert (crash.step, crash.time, crash.kind(2)) == (6, 2.0, "crash")
    assert combine([LastStep(5, 1.0, all_stopped=True), LastStep(5, 1.5, all_stopped=True)]).kind(2) == "preemption"
    assert combine([LastStep(5, 1.0, ordered=True), LastStep(5, 1.0)]).kind(2) == "hang"
    grown = combine([LastStep(5, 1.0, world_size=2), LastStep(5, 1.0, world_size=2)])
    assert (grown.kind(4), grown.kind(2), grown.kind(1)) == ("rescale", "crash", "crash")
    # torchrun SIGTERMs every worker when a node joins: they commit and leave "stopped".
    assert combine([LastStep(5, 1.0, all_stopped=True, world_size=1)]).kind(2) == "rescale"
    assert combine([None, None]) is None


def test_a_restart_reports_its_cost_once_its_first_step_is_done(tmp_path):
    before = StepRecord(tmp_path, "run", 0)
    before.mark(12)
    before.left(STOPPED)
    before.close()
    tracker = RestartCostMeter(StepRecord(tmp_path, "run", 0), 0, 0, gather=lambda obj: [obj])
    tracker.resumed(10, "object_store", restart=True)  # two completed steps were not in the checkpoint
    assert tracker.report is None
    tracker.step_done(11)
    r = tracker.report
    assert r is not None and (r.kind, r.source, r.steps_lost) == ("preemption", "object_store", 2)
    assert 0 <= r.seconds < 5
    tracker.step_done(12)
    assert tracker.report is r  # reported once
    tracker.finished()
    assert StepRecord(tmp_path, "run", 0).read_node() is None
    first = RestartCostMeter(StepRecord(tmp_path, "run", 0), 0, 0, gather=lambda obj: [obj])
    first.resumed(0, "fresh", restart=True)
    first.step_done(1)
    assert first.report is None  # no records: no recovery


@pytest.mark.parametrize("bad", [
    {"kind": "meteor", "source": "memory", "seconds": 1.0, "steps_lost": 0, "at": 1.0},
    {"kind": "crash", "source": "memory", "seconds": float("nan"), "steps_lost": 0, "at": 1.0},
    {"kind": "crash", "source": "memory", "seconds": 1.0, "steps_lost": -3, "at": 1.0},
    {"kind": "crash", "source": "memory", "seconds": 1.0, "steps_lost": True, "at": 1.0},
    {"kind": "crash", "source": "memory", "seconds": 1.0, "steps_lost": 0},
    {"kind": "crash", "source": "memory", "seconds": 1.0, "steps_lost": 0, "at": float("inf")},
    ["crash"],
])
def test_a_heartbeat_with_a_malformed_recovery_is_refused(bad):
    body = json.loads(hb().to_json())
    body["recovery"] = bad
    with pytest.raises(ValueError):
        Heartbeat.from_json(json.dumps(body).encode())


def test_the_supervisor_counts_each_recovery_once():
    metrics = SupervisorMetrics(run="r")
    book = FailureCostBook(metrics)
    rec = {"kind": "crash", "source": "memory", "seconds": 1.2, "steps_lost": 0, "at": time.time()}
    for _ in range(5):  # rank 0 repeats it in every heartbeat
        book.observe(hb(step=9, pid=200, recovery=rec))
    book.observe(hb(rank=1, step=9, pid=201, recovery=rec))  # only rank 0's counts
    book.observe(hb(step=20, pid=300, recovery={**rec, "kind": "hang", "source": "object_store",
                                                "seconds": 7.0, "steps_lost": 4}))
    text = generate_latest(metrics.exported).decode()
    assert 'ftdiff_recovery_seconds_count{kind="crash",run="r",source="memory"} 1.0' in text
    assert 'ftdiff_recovery_seconds_count{kind="hang",run="r",source="object_store"} 1.0' in text
    assert 'ftdiff_steps_lost_total{kind="hang",run="r"} 4.0' in text
    assert 'ftdiff_steps_lost_total{kind="crash",run="r"} 0.0' in text


def test_goodput_is_nan_at_first_one_when_undisturbed_and_falls_with_an_outage():
    now = [0.0]
    book = FailureCostBook(SupervisorMetrics(), window_s=100, clock=lambda: now[0])
    assert math.isnan(book.goodput())
    step = 0
    for _ in range(100):  # one step per second, a heartbeat per second
        now[0] += 1
        step += 1
        book.observe(hb(step=step))
    assert book.goodput() == pytest.approx(1.0, abs=0.02)
    # A 20 s outage, then a restart that trains 5 steps again before any new step.
    now[0] += 20
    step -= 5
    for _ in range(30):
        now[0] += 1
        step += 1
        book.observe(hb(step=step, pid=101))
    # 100 s window: 25 new steps in the last 30 s, none in the 20 s outage, 50 before it.
    assert book.goodput() == pytest.approx(0.75, abs=0.03)


def test_a_hang_the_supervisor_detected_is_counted_as_a_hang():
    """In local mode the stuck process is SIGKILLed and its peers fail in a collective: the
    workers report a crash, the supervisor knows better."""
    metrics = SupervisorMetrics(run="r")
    book = FailureCostBook(metrics)
    book.diagnosed("hang")
    rec = {"kind": "crash", "source": "memory", "seconds": 5.0, "steps_lost": 0, "at": time.time()}
    book.observe(hb(step=9, pid=200, recovery=rec))
    book.observe(hb(step=30, pid=300, recovery=rec))  # the next crash is a crash again
    text = generate_latest(metrics.exported).decode()
    assert 'ftdiff_recovery_seconds_count{kind="hang",run="r",source="memory"} 1.0' in text
    assert 'ftdiff_recovery_seconds_count{kind="crash",run="r",source="memory"} 1.0' in text


def test_an_operators_restart_is_ordered_and_a_predecessors_count_is_not_repeated():
    metrics = SupervisorMetrics(run="r")
    book = FailureCostBook(metrics)
    rec = {"kind": "hang", "source": "memory", "seconds": 2.0, "steps_lost": 0, "at": time.time()}
    book.diagnosed("ordered")
    book.observe(hb(step=9, pid=200, recovery=rec))
    # A supervisor started after a recovery (a roll): rank 0 still reports it; not counted again.
    book.observe(hb(step=12, pid=300, recovery={**rec, "at": book.started_at - 5}))
    text = generate_latest(metrics.exported).decode()
    assert 'ftdiff_recovery_seconds_count{kind="ordered",run="r",source="memory"} 1.0' in text
    assert 'ftdiff_recovery_seconds_count{kind="hang",run="r",source="memory"} 0.0' in text


def test_goodput_of_slow_steps_and_checkpoint_stalls_is_one_and_a_new_job_starts_afresh():
    now = [0.0]
    book = FailureCostBook(SupervisorMetrics(), window_s=100, clock=lambda: now[0])
    step = 0
    for t in range(1, 121):  # a step every 2.5 s, a heartbeat every second; a 5 s save every 10 steps
        now[0] = float(t)
        if t % 25 == 0:
            continue  # a stall: no step for a while
        if t % 5 in (0, 3) and t % 25 != 1:
            step += 1
        book.observe(hb(step=step, phase="checkpointing" if t % 25 == 24 else "training"))
    assert book.goodput() == pytest.approx(1.0, abs=0.06)
    book.reset()  # attach mode: every rank finished; a new job reports from step 0
    assert math.isnan(book.goodput())


def test_records_in_a_folder_others_can_write_are_ignored_and_a_planted_fifo_never_blocks(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    StepRecord(shared, "run", 0).mark(5)
    os.chmod(shared, 0o777)
    assert StepRecord(shared, "run", 1).read_node() is None
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    os.mkfifo(mine / StepRecord(mine, "run", 3).path.name)
    StepRecord(mine, "run", 0).mark(5)
    t0 = time.monotonic()
    newest = StepRecord(mine, "run", 1).read_node()
    assert time.monotonic() - t0 < 1 and newest is not None and newest.step == 5


def test_a_first_start_reports_nothing_and_clears_what_an_earlier_run_left(tmp_path):
    old = StepRecord(tmp_path, "run", 0)
    old.mark(8)
    old.close()
    tracker = RestartCostMeter(StepRecord(tmp_path, "run", 0), 0, 0, gather=lambda obj: [obj])
    tracker.resumed(0, "fresh", restart=False)  # the same run id, a new root
    tracker.step_done(1)
    assert tracker.report is None
