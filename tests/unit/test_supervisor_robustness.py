"""The supervisor against crashes counted per rank, stale give-ups, finished jobs, hostile or
buggy heartbeats, and HTTP clients that misbehave."""

import json
import logging
import math
import os
import socket
import time
import urllib.error
import urllib.request

import pytest

from service.config import load_config
from service.heartbeat import Heartbeat, HeartbeatSender
from service.metrics import SupervisorMetrics, WorkerRelay
from service.node.exits import safe_to_kill
from service.supervisor import server as server_mod
from service.supervisor.attach import AttachedSupervisor
from service.supervisor.monitor import JobMonitor
from service.supervisor.server import SupervisorServer
from tests.helpers import Clock, hb, post_json


def generation(m, pids, started, world=4, per_node=2, step=0, phase="training", committed=None):
    """One heartbeat from every rank; the number of restart events they revealed."""
    return sum(m.observe(hb(r, pids[r % per_node], step=step, phase=phase, world=world,
                            node=str(r // per_node), committed=committed, started=started))
               for r in range(world))


def _post(url, body):
    """Error statuses are answers here: (status, body), never an exception."""
    return post_json(url, body, check=False)


def _raw(port, request: bytes, timeout=5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(4096):
            out += chunk
        return out


@pytest.fixture
def server():
    srv = SupervisorServer("127.0.0.1", 0, "tok", JobMonitor(10), SupervisorMetrics()).start()
    yield srv
    srv.stop()


@pytest.fixture
def attached():
    cfg = load_config(None, ["supervisor.port=0", "metrics.port=0", "supervisor.max_restarts=2",
                             "supervisor.hang_timeout_s=10"])
    sup = AttachedSupervisor(cfg, "tok")
    sup.monitor.clock = Clock()
    sup.endpoints.start()
    yield sup
    sup.endpoints.stop()


def state(sup) -> str:
    return next(s.labels["ftdiff_job_state"] for s in next(iter(sup.metrics.state.collect())).samples
                if s.value == 1)


# -- one restart of the job is one restart, whatever the number of ranks --------------------------
def test_one_crash_of_a_2x2_job_is_one_restart_and_each_later_crash_one_more():
    m = JobMonitor(10, Clock())
    assert generation(m, [31, 32], 1000.0) == 0
    assert generation(m, [45, 46], 2000.0) == 1  # every rank came back with a new process
    assert generation(m, [60, 61], 3002.0) == 1
    assert generation(m, [75, 76], 3003.0) == 1


def test_a_drain_and_regrow_is_no_crash():
    m = JobMonitor(3, Clock())
    assert generation(m, list(range(30, 38)), 1000.0, world=16, per_node=8, step=1500) == 0
    generation(m, list(range(30, 38)), 1000.0, world=16, per_node=8, step=1501, phase="done")
    assert generation(m, list(range(50, 58)), 2000.0, world=8, per_node=8, phase="loading") == 0
    assert generation(m, list(range(70, 78)), 3000.0, world=16, per_node=8, phase="loading") == 0


def test_a_replaced_pod_whose_worker_has_the_same_pid_restarted():
    m = JobMonitor(10, Clock())
    m.observe(hb(0, 31, node="0", started=1000.0))
    m.observe(hb(1, 31, node="1", started=1000.0))
    assert m.observe(hb(1, 31, node="1", step=0, phase="loading", started=2000.0))
    assert m.ranks[1].hb.started == 2000.0


def test_the_supervisor_counts_one_crash_once(attached):
    url = f"http://127.0.0.1:{attached.server.port}/heartbeat"
    for pids, started in (([31, 32], 1000.0), ([45, 46], 2000.0)):
        for r in range(4):
            beat = hb(r, pids[r % 2], world=4, node=str(r // 2), committed=100, started=started)
            assert _post(url, beat.to_json())[0] == 200
    reg = attached.metrics.registry
    assert reg.get_sample_value("ftdiff_job_restarts_total", {"reason": "worker_crash"}) == 1
    assert reg.get_sample_value("ftdiff_job_failures_detected_total", {"kind": "worker_crash"}) == 1


# -- no silent, permanent give-up -----------------------------------------------------------------
def test_a_new_commit_resets_the_failure_count_before_the_next_failure(attached):
    m, clock = attached.monitor, attached.monitor.clock
    m.observe(hb(0, 10, step=100, committed=100))
    m.observe(hb(1, 11, step=100, committed=100))
    for _ in range(5):  # a bad hour: more failures than max_restarts, no commit
        attached.ledger.record("worker_crash", "worker_crash")
    assert attached._gave_up()
    m.observe(hb(0, 10, step=300, committed=200))  # recovered: trains and commits again
    m.observe(hb(1, 11, step=300, committed=200))
    assert attached.ledger.failures_since_commit == 0 and not attached._gave_up()
    clock.t += 11  # then a real hang
    attached.on_hung(m.hung())
    assert m.generation == 1  # the restart was ordered
    assert attached.metrics.registry.get_sample_value("ftdiff_job_restarts_total", {"reason": "hang"}) == 1


def test_giving_up_is_loud_and_ends_when_the_job_progresses(attached, caplog):
    m, clock = attached.monitor, attached.monitor.clock
    m.observe(hb(0, 10, step=100, committed=100))
    for _ in range(3):
        attached.ledger.record("hang", "hang")
    clock.t += 11
    with caplog.at_level(logging.ERROR, logger="service.supervisor.attach"):
        attached.on_hung(m.hung())
        attached.on_hung(m.hung())
    assert m.generation == 0 and state(attached) == "failed"
    assert len([r for r in caplog.records if "giving up" in r.getMessage()]) == 1  # once, not per tick
    attached.after_tick()
    assert state(attached) == "failed"
    clock.t += 1
    m.observe(hb(0, 10, step=101, committed=100))  # training steps advance again
    attached.after_tick()
    assert state(attached) == "running"


def test_a_refusal_holds_only_until_a_new_run_trains(attached):
    m, clock = attached.monitor, attached.monitor.clock
    attached.refused_by = hb(0, 31, phase="refused")
    attached.on_refused(attached.refused_by)
    assert state(attached) == "failed"
    clock.t += 1
    for step in (0, 10):  # the fixed, recreated job trains
        for r in range(2):
            m.observe(hb(r, 40 + r, step=step, node=str(r), started=5000.0))
        clock.t += 1
    attached.after_tick()
    assert attached.refused_by is None and state(attached) == "running"
    clock.t += 11  # and then hangs: a restart is ordered
    attached.on_hung(m.hung())
    assert m.generation == 1


# -- a finished job is no job whose workers do not report -----------------------------------------
def test_a_finished_job_succeeded_until_workers_report_again(attached):
    m = attached.monitor
    for r in range(2):
        m.observe(hb(r, 30, step=99, node=str(r), committed=90))
    m.observe(hb(0, 30, step=100, node="0", committed=100, phase="done"))
    attached.after_tick()
    assert state(attached) == "running"  # rank 1 is still at it
    m.observe(hb(1, 30, step=100, node="1", committed=100, phase="done"))
    attached.after_tick()
    assert state(attached) == "succeeded" and m.world_size() == 0
    m.observe(hb(0, 50, step=0, node="0", started=9.0))  # a new Job
    attached.after_tick()
    assert state(attached) == "running"


# -- no heartbeat names a process that is not a worker --------------------------------------------
BASE = {"rank": 0, "local_rank": 0, "node": "0", "pid": 31, "world_size": 2, "step": 5, "phase": "training",
        "last_committed_step": None, "restart_count": 0, "time": 1.0}


@pytest.mark.parametrize("change", [
    {"pid": -1}, {"pid": 0}, {"pid": 1}, {"rank": -1}, {"rank": 2}, {"world_size": 0},
    {"local_rank": -1}, {"rank": [1]}, {"rank": True}, {"pid": 31.5}, {"io_bytes": 10**400},
    {"time": 10**400},
    {"world_size": 10**30}, {"step": -3}, {"node": 7}, {"node": ""},
])
def test_heartbeats_no_worker_can_send_are_refused(change):
    with pytest.raises(ValueError):
        Heartbeat.from_json(json.dumps({**BASE, **change}).encode())


@pytest.mark.parametrize("raw", [b'"io_bytes":Infinity', b'"io_bytes":NaN', b'"started":NaN',
                                 b'"time":-Infinity'])
def test_non_finite_numbers_are_refused(raw):
    body = json.dumps(BASE).encode()[:-1] + b"," + raw + b"}"
    with pytest.raises(ValueError):
        Heartbeat.from_json(body)


def test_a_valid_heartbeat_still_parses():
    assert Heartbeat.from_json(hb(1, 31, world=2, committed=3).to_json()).rank == 1


def test_kill_lists_never_name_a_group_or_init():
    m = JobMonitor(10, Clock())
    m.observe(hb(0, 31, node="a"))
    for bad in (-1, 0, 1):  # unvalidated (constructed here): the monitor still never names them
        m.observe(hb(1, bad, node="a", started=float(bad + 5)))
        m.order_restart(stuck=[m.ranks[1]])
        m.observe(hb(1, 50 + bad, node="a", started=99.0))
    assert m.kill_list(hb(0, 31, node="a")) == []


def test_a_worker_never_signals_a_group_init_or_itself(monkeypatch):
    signalled, exited = [], []
    from service.errors import EXIT_RESTART_ORDERED
    from service.node import exits

    monkeypatch.setattr(exits.os, "kill", lambda pid, sig: signalled.append(pid))
    monkeypatch.setattr(exits.os, "_exit", lambda code: exited.append(code))
    monkeypatch.setattr(exits.logging, "shutdown", lambda: None)
    monkeypatch.setattr(exits, "children", lambda pid: [777] if pid == os.getpid() else [])
    exits.exit_for_restart(1, [-1, 0, 1, os.getpid(), os.getppid(), os.getpgrp(), 424242, 5555], protected=(5555,))
    # The named stuck peer, then its own children (data-loader workers), then the hard exit.
    assert signalled == [424242, 777] and exited == [EXIT_RESTART_ORDERED]
    assert not any(safe_to_kill(p) for p in (-1, 0, 1, True, "12", os.getpid()))
    assert not safe_to_kill(5555, protected=(5555,))  # the worker's agent


def test_the_sender_passes_on_only_safe_pids(server, monkeypatch):
    orders = []
    sender = HeartbeatSender(f"http://127.0.0.1:{server.port}", "tok", 0.05, lambda: hb(pid=7),
                             on_exit_order=lambda gen, kill: orders.append(kill))
    sender.send_once()
    server.monitor.order_restart()
    monkeypatch.setattr(server.monitor, "kill_list", lambda hb: [-1, 0, 1, os.getpid(), 99])
    sender.send_once()
    assert orders == [[99]]


def test_a_stray_negative_rank_never_reaches_the_monitor(server):
    status, _ = _post(f"http://127.0.0.1:{server.port}/heartbeat", hb(-1, 99, node="zz").to_json())
    assert status == 400 and server.monitor.ranks == {}
    assert server.metrics.rejected._value.get() == 1


# -- HTTP -----------------------------------------------------------------------------------------
def _head(length: str) -> bytes:
    return (f"POST /heartbeat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


@pytest.mark.parametrize("length,code", [("-1", b"400"), ("abc", b"400"), ("70000", b"413")])
def test_bad_content_lengths_are_answered_and_counted(server, length, code):
    answer = _raw(server.port, _head(length) + b" " * 1000)
    assert answer.split(b"\r\n")[0].split(b" ")[1] == code  # an answer, not a dropped connection
    assert server.metrics.rejected._value.get() == 1
    assert server.monitor.ranks == {}


def test_an_infinite_number_is_a_400_not_a_dropped_connection(server):
    body = json.dumps(BASE).encode()[:-1] + b',"io_bytes":Infinity}'
    status, answer = _post(f"http://127.0.0.1:{server.port}/heartbeat", body)
    assert status == 400 and "io_bytes" in answer["error"]
    assert server.metrics.rejected._value.get() == 1


def test_idle_connections_are_closed(monkeypatch):
    monkeypatch.setattr(server_mod, "REQUEST_TIMEOUT_S", 0.3)
    srv = SupervisorServer("127.0.0.1", 0, "tok", JobMonitor(10), SupervisorMetrics()).start()
    try:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(b"POST /heartbeat HTTP/1.1\r\n")  # and then nothing
            assert s.recv(100) == b""  # closed by the server
        assert time.monotonic() - t0 < 3
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(_head("100") + b"{")  # a body that never arrives
            assert s.recv(100) == b""
        assert time.monotonic() - t0 < 3
    finally:
        srv.stop()


# -- one rank's metrics never break the scrape ----------------------------------------------------
GOOD = [["ftdiff_train_step", "gauge", "d", [["ftdiff_train_step", {}, 2.0]]]]


@pytest.mark.parametrize("bad", [
    [[1, 2]],
    [["x", "bogus", "d", [["x", {}, 1.0]]]],
    [["x", ["gauge"], "d", [["x", {}, 1.0]]]],
    [["x", "gauge", "d", [["x", {}, 1.0]]], ["x", "gauge", "d", []]],
    [["x_total", "counter", "d", [["x_total", {}, "1.0"]]]],
    [["x", "gauge", "d", [["y", {}, 1.0]]]],
    [["x", "gauge", "d", [["x", {"a": 1}, 1.0]]]],
    [["x", "gauge", "d", [["x", {"a b": "1"}, 1.0]]]],
    [["x\n", "gauge", "d", [["x\n", {}, 1.0]]]],
    [["ftdiff_job_state", "gauge", "spoof", [["ftdiff_job_state", {"ftdiff_job_state": "failed"}, 1.0]]]],
    {"not": "a list"},
])
def test_a_malformed_snapshot_is_dropped_and_the_heartbeat_kept(server, bad):
    url = f"http://127.0.0.1:{server.port}"
    beat = hb(0, 31)
    beat.metrics = GOOD
    assert _post(url + "/heartbeat", beat.to_json())[0] == 200
    body = json.loads(beat.to_json())
    body["step"], body["metrics"] = 1, bad
    status, answer = _post(url + "/heartbeat", json.dumps(body).encode())
    assert status == 200 and answer["action"] == "none" and answer["metrics"].startswith("rejected")
    assert server.monitor.ranks[0].hb.step == 1  # the heartbeat counted
    assert server.metrics.rejected._value.get() == 1
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'ftdiff_train_step{rank="0"} 2.0' in text  # the last good snapshot is still served
    assert text.count("# TYPE ftdiff_job_state ") == 1


def test_every_prometheus_kind_and_special_value_is_relayed():
    snap = [
        ["a", "counter", "d", [["a_total", {"stage": "w"}, 3.0]]],
        ["b", "histogram", "d", [["b_bucket", {"le": "+Inf"}, 1.0], ["b_count", {}, 1.0],
                                 ["b_sum", {}, 0.5]]],
        ["c", "stateset", "d", [["c", {"c": "memory"}, 1.0]]],
        ["d", "info", "d", [["d_info", {"v": "1"}, 1.0]]],
        ["e", "untyped", "d", [["e", {}, math.nan]]],
        ["f", "summary", "d", [["f_count", {}, 1.0]]],
        ["g", "gaugehistogram", "d", [["g_gcount", {}, 1.0]]],
        ["h", "gauge", "d", [["h", {}, math.inf]]],
    ]
    assert len(WorkerRelay.check(json.loads(json.dumps(snap)))) == len(snap)


def test_ranks_that_disagree_on_a_family_never_break_the_scrape():
    from prometheus_client import generate_latest

    metrics = SupervisorMetrics()
    metrics.relay.update(0, [["x", "gauge", "d", [["x", {}, 1.0]]]])
    metrics.relay.update(1, [["x", "counter", "d", [["x_total", {}, 1.0]]]])  # an older image
    text = generate_latest(metrics.registry).decode()
    assert 'x{rank="0"} 1.0' in text and "x_total" not in text


def test_a_negative_rank_that_got_in_is_pruned():
    m = JobMonitor(10, Clock())
    m.observe(hb(-1, 99, node="zz"))  # constructed here, past the wire format's validation
    m.observe(hb(0, 31))
    assert set(m.ranks) == {0}


def test_a_frozen_rank_is_silent_by_its_hang_and_ordered_processes_that_stay_are_named():
    """The waiting rank may be flagged first (its last step change came earlier): the frozen
    one is still found (silent for half the hang timeout at most, whatever the interval), and
    every process ordered out is named once a grace has passed, for the launcher to kill."""
    clock = Clock()
    m = JobMonitor(hang_timeout_s=4, clock=clock, heartbeat_interval_s=1.5)
    assert m.silence_s == 2.0  # 3 intervals would be 4.5 s: never before the hang is seen
    m.observe(hb(0, pid=10, step=5))
    m.observe(hb(1, pid=11, step=5))
    clock.t += 4.5  # rank 1 froze; rank 0 waits on it and still heartbeats
    m.observe(hb(0, pid=10, step=5))
    assert [s.hb.pid for s in m.silent_among(m.states(), m.silence_s)] == [11]
    m.order_restart()
    assert m.ordered_before(1.0) == []
    clock.t += 1.5
    assert sorted(p[1] for p in m.ordered_before(1.0)) == [10, 11]
    m.drop_order(("0", 11, 1.0))
    assert [p[1] for p in m.ordered_before(1.0)] == [10]
