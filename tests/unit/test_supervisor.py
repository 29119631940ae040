import json
import urllib.error
import urllib.request

import pytest

from service.config import load_config
from service.errors import UserError
from service.heartbeat import Heartbeat, HeartbeatSender, token_ok
from service.metrics import SupervisorMetrics
from service.supervisor.monitor import JobMonitor
from service.supervisor.report import failure_report
from service.supervisor.server import SupervisorEndpoints, SupervisorServer
from service.supervisor.torchrun import check_job_geometry, torchrun_command
from tests.helpers import Clock, hb
from tests.helpers import post_json as _post


def test_hang_is_no_progress_or_no_heartbeat_for_the_timeout():
    clock = Clock()
    m = JobMonitor(10, clock)
    m.observe(hb(0, 100, step=1))
    m.observe(hb(1, 101, step=1))
    clock.t += 6
    m.observe(hb(0, 100, step=2))  # rank 0 progresses; rank 1 goes silent
    clock.t += 5
    assert [s.hb.rank for s in m.hung()] == [1]
    m.observe(hb(1, 101, step=1))  # heartbeats again, but still no progress
    assert [s.hb.rank for s in m.hung()] == [1]
    m.observe(hb(1, 101, step=3))
    assert m.hung() == []


def test_new_pid_is_a_restart_and_ordered_exits_are_not():
    m = JobMonitor(10, Clock())
    assert not m.observe(hb(0, 100))
    assert m.observe(hb(0, 200))
    doomed = m.order_restart()
    assert [s.hb.pid for s in doomed] == [200]
    assert m.should_exit(hb(0, 200)) and not m.should_exit(hb(0, 300))
    assert not m.observe(hb(0, 200))  # the doomed process is ignored
    assert not m.observe(hb(0, 300))  # its replacement is not counted as a crash
    assert m.generation == 1


def test_exit_orders_name_one_process_and_expire():
    """Pods have their own PID namespaces: a restarted container's worker gets the same pid
    again, and so does a worker on every other pod. An order must hit only the process it was
    meant for."""
    clock = Clock()
    m = JobMonitor(10, clock, order_ttl_s=60)
    m.observe(hb(0, 31, node="pod-a", started=5.0))
    m.observe(hb(1, 31, node="pod-b", started=6.0))
    m.order_restart(stuck=[m.ranks[0]])
    assert m.should_exit(hb(0, 31, node="pod-a", started=5.0))
    assert not m.should_exit(hb(0, 31, node="pod-a", started=50.0))  # the restarted container
    assert not m.should_exit(hb(2, 31, node="pod-c", started=5.0))  # same pid, another pod
    assert not m.observe(hb(0, 31, node="pod-a", started=5.0))  # the doomed one is ignored
    assert m.kill_list(hb(1, 31, node="pod-b", started=6.0)) == []  # stuck ones only on its own node
    assert m.kill_list(hb(3, 7, node="pod-a", started=9.0)) == [31]
    clock.t += 61  # orders expire: nothing they named can still be waiting for them
    assert not m.should_exit(hb(0, 31, node="pod-a", started=5.0))
    assert m.kill_list(hb(3, 7, node="pod-a", started=9.0)) == []


def test_commits_and_world_size_changes():
    m = JobMonitor(10, Clock())
    m.observe(hb(0, 1, committed=4))
    m.observe(hb(1, 2, committed=8))
    assert m.last_committed_step == 8 and m.world_size() == 2
    m.observe(hb(0, 3, world=1, committed=8))
    assert set(m.ranks) == {0}


def test_token_check():
    assert token_ok("Bearer s3cret", "s3cret")
    assert not token_ok("Bearer nope", "s3cret")
    assert not token_ok(None, "s3cret") and not token_ok("s3cret", "s3cret")


@pytest.fixture
def server():
    metrics = SupervisorMetrics()
    monitor = JobMonitor(10)
    srv = SupervisorServer("127.0.0.1", 0, "tok", monitor, metrics).start()
    yield srv
    srv.stop()


def test_server_refuses_and_counts_unauthenticated_requests(server):
    url = f"http://127.0.0.1:{server.port}"
    for token in (None, "wrong"):
        for path in ("/heartbeat", "/stuck", "/control/restart"):
            with pytest.raises(urllib.error.HTTPError) as e:
                _post(url + path, hb().to_json(), token)
            assert e.value.code == 401
    assert server.metrics.rejected._value.get() == 6
    assert server.monitor.ranks == {}
    with pytest.raises(urllib.error.HTTPError) as e:
        _post(url + "/heartbeat", b"{not json", "tok")
    assert e.value.code == 400
    status, answer = _post(url + "/heartbeat", hb().to_json(), "tok")
    assert status == 200 and answer["action"] == "none"
    assert 0 in server.monitor.ranks


def test_metrics_address_serves_scrapes_but_never_control():
    from service.supervisor.torchrun import free_port

    cfg = load_config(None, ['supervisor.host="127.0.0.1"', "supervisor.port=0",
                             'metrics.host="127.0.0.1"', f"metrics.port={free_port()}"])
    monitor = JobMonitor(10)
    endpoints = SupervisorEndpoints(cfg, "tok", monitor, SupervisorMetrics(), ready=lambda: True).start()
    try:
        assert endpoints.scrape is not None
        scrape = f"http://{endpoints.metrics_address}"
        control = f"http://127.0.0.1:{endpoints.control.port}"
        for path in ("/metrics", "/healthz", "/readyz"):
            with urllib.request.urlopen(scrape + path, timeout=5) as r:
                assert r.status == 200
        for path in ("/heartbeat", "/control/restart"):  # even with the right token
            with pytest.raises(urllib.error.HTTPError) as e:
                _post(scrape + path, hb().to_json(), "tok")
            assert e.value.code == 404
        assert monitor.ranks == {}
        assert _post(control + "/heartbeat", hb().to_json(), "tok")[0] == 200
        assert 0 in monitor.ranks
    finally:
        endpoints.stop()


def test_server_relays_exit_orders_and_serves_metrics(server):
    url = f"http://127.0.0.1:{server.port}"
    _post(url + "/heartbeat", hb(pid=42).to_json(), "tok")
    server.monitor.order_restart()
    assert _post(url + "/heartbeat", hb(pid=42).to_json(), "tok")[1]["action"] == "exit"
    assert _post(url + "/heartbeat", hb(pid=43).to_json(), "tok")[1]["action"] == "none"
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    assert "ftdiff_job_restarts_total" in text and "ftdiff_supervisor_rejected_requests_total" in text
    with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
        assert r.status == 200


def test_sender_exits_on_order_and_survives_unreachable_supervisor(server):
    orders = []
    sender = HeartbeatSender(f"http://127.0.0.1:{server.port}", "tok", 0.05, lambda: hb(pid=7),
                             on_exit_order=lambda gen, kill: orders.append((gen, kill)))
    sender.send_once()
    stuck = hb(rank=1, pid=99)
    server.monitor.observe(stuck)
    server.monitor.order_restart(stuck=[server.monitor.ranks[1]])
    sender.send_once()
    assert orders == [(1, [99])]  # same node "0": this worker ends its stuck peer on the way out
    dead = HeartbeatSender("http://127.0.0.1:1", "tok", 0.05, lambda: hb(pid=8)).start()
    import time

    time.sleep(0.3)
    dead.stop()
    assert dead.failed >= 2 and dead.sent == 0


def test_job_geometry_errors():
    cfg = load_config(None, ["supervisor.min_nodes=3"])
    with pytest.raises(UserError, match="min_nodes = 3 is more than --nnodes = 2"):
        check_job_geometry(cfg, 2, 1)
    with pytest.raises(UserError, match="not divisible by the world size 3"):
        check_job_geometry(load_config(None), 3, 1)
    check_job_geometry(load_config(None, ["supervisor.min_nodes=1"]), 2, 2)
    # memory:// is one process's memory: several processes would each keep their own.
    in_memory = load_config(None, ['checkpoint.url="memory://ckpt"'])
    with pytest.raises(UserError, match="one process's memory, but this job has 2 processes"):
        check_job_geometry(in_memory, 1, 2)
    check_job_geometry(in_memory, 1, 1)


def test_torchrun_command_shape():
    cmd = torchrun_command(["--config", "x"], 2, 1, "127.0.0.1:5", 3, min_nodes=1, log_dir="/tmp/l")
    assert "--nnodes=1:2" in cmd and "--max-restarts=3" in cmd and "--rdzv-backend=c10d" in cmd
    assert cmd[-4:] == ["-m", "service.train", "--config", "x"]
    assert cmd[1:3] == ["-m", "service.node.agent"]  # torchrun, with exit codes that mean something


def test_failure_report_names_rank_node_and_traceback(tmp_path):
    err = tmp_path / "node1" / "run_x" / "attempt_0" / "0" / "error.json"
    err.parent.mkdir(parents=True)
    err.write_text(json.dumps({"message": {"message": "RuntimeError: injected",
                                           "extraInfo": {"py_callstack": "Traceback...\nRuntimeError: injected"}}}))
    m = JobMonitor(10)
    m.observe(hb(rank=1, pid=5, node="1", committed=4))
    m.ranks[1].hb.local_rank = 0
    text = failure_report(str(tmp_path), m, 1, 1)
    assert "rank 1" in text and "node 1" in text and "RuntimeError: injected" in text
    assert "last committed step: 4" in text
    assert "failing worker: rank 1" in text and "was lost" not in text
    # Node 0's agent was killed: the only traceback is node 1's, a peer's view of the loss.
    text = failure_report(str(tmp_path), m, 0, -9)
    assert "node 0 was lost: its torchrun agent was ended by signal 9" in text
    assert "no worker traceback from node 0" in text and "failing worker" not in text
    assert "node 0 was lost" in failure_report(str(tmp_path), m, 0, 128 + 15)  # through the wrapper


def test_worker_metrics_are_relayed_with_a_rank_label(server):
    from prometheus_client import CollectorRegistry

    from service.metrics import WorkerMetrics, metric_samples

    worker = WorkerMetrics(CollectorRegistry())
    worker.checkpoint.failures.labels(stage="write").inc(2)
    worker.checkpoint.save_duration.labels(phase="stall").observe(0.01)
    worker.train.step.set(17)
    beat = hb(rank=1, pid=9)
    beat.metrics = metric_samples(worker.registry)
    url = f"http://127.0.0.1:{server.port}"
    _post(url + "/heartbeat", beat.to_json(), "tok")
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'ftdiff_checkpoint_failures_total{rank="1",stage="write"} 2.0' in text
    assert 'ftdiff_train_step{rank="1"} 17.0' in text
    assert 'ftdiff_checkpoint_save_duration_seconds_count{phase="stall",rank="1"} 1.0' in text


def test_heartbeats_from_unknown_nodes_are_refused():
    metrics = SupervisorMetrics()
    srv = SupervisorServer("127.0.0.1", 0, "tok", JobMonitor(10), metrics, known_nodes={"0", "1"}).start()
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            _post(f"http://127.0.0.1:{srv.port}/heartbeat", hb(node="7").to_json(), "tok")
        assert e.value.code == 403
        assert metrics.rejected._value.get() == 1 and srv.monitor.ranks == {}
        assert _post(f"http://127.0.0.1:{srv.port}/heartbeat", hb(node="1").to_json(), "tok")[0] == 200
    finally:
        srv.stop()


def test_failure_ledger_backoff_resets_on_new_commits():
    from service.supervisor.ledger import FailureLedger

    m = JobMonitor(10, Clock())
    metrics = SupervisorMetrics()
    ledger = FailureLedger(m, metrics, crash_loop_failures=2)
    delays = []
    for _ in range(5):
        ledger.record("worker_crash", "worker_crash")
        delays.append(ledger.backoff_s())
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0]
    m.observe(hb(committed=10))  # progress: the loop is broken
    ledger.record("hang", "hang")
    assert ledger.failures_since_commit == 1 and ledger.backoff_s() == 0.0
    for _ in range(20):
        ledger.record("hang")
    assert ledger.backoff_s() == 30.0


def test_a_node_whose_ranks_all_went_quiet_is_silent():
    clock = Clock()
    m = JobMonitor(5, clock)
    m.observe(hb(0, 10, node="a"))
    m.observe(hb(1, 11, node="b"))
    clock.t += 6
    m.observe(hb(0, 10, step=1, node="a"))
    assert m.silent_nodes(1.0) == {"b"}
    single = JobMonitor(5, clock)
    single.observe(hb(0, 10, node="a"))
    clock.t += 6
    assert single.silent_nodes(1.0) == set()  # one node: a hang, not a lost node


def test_a_finished_worker_is_not_a_hang():
    clock = Clock()
    m = JobMonitor(5, clock)
    m.observe(hb(0, 10, step=40))
    m.observe(hb(0, 10, step=40, phase="done", committed=40))
    clock.t += 60
    assert m.hung() == [] and m.last_committed_step == 40


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_silent_agents_are_ended_for_a_relaunch():
    """Agents that run while no worker reports (stuck in rendezvous or start-up) are ended,
    with everything they started; a recent launch or heartbeat keeps them alive."""
    import shutil
    import subprocess
    import sys
    import time

    from service.supervisor import procs
    from service.supervisor.launcher import Agent, LocalSupervisor

    def gone(pid: int) -> bool:  # exited, or a zombie waiting for its (new) parent to reap it
        try:
            return open(f"/proc/{pid}/stat").read().split()[2] == "Z"
        except FileNotFoundError:
            return True

    cfg = load_config(None, ["supervisor.startup_timeout_s=0.5", "supervisor.port=0", "metrics.port=0"])
    sup = LocalSupervisor(cfg, None, [], nnodes=1, nproc_per_node=1)
    # A stand-in agent with a child of its own, as torchrun has its workers.
    agent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen("
                              "[sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"])
    try:
        deadline = time.monotonic() + 10
        while not procs.children(agent.pid):
            assert time.monotonic() < deadline, "the stand-in agent did not start its child"
            time.sleep(0.05)
        child = procs.children(agent.pid)[0]
        sup.agents[0] = Agent(0, agent)
        sup._handle_silence()
        assert agent.poll() is None  # just launched: not silent yet
        time.sleep(0.7)
        sup.monitor.observe(hb(rank=0, pid=999999))  # a worker reported: not silent
        sup._handle_silence()
        assert agent.poll() is None
        time.sleep(0.7)
        sup._handle_silence()
        assert agent.wait(timeout=10) == -9
        deadline = time.monotonic() + 10
        while not gone(child):
            assert time.monotonic() < deadline, "the agent's child survived"
            time.sleep(0.05)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        shutil.rmtree(sup.log_dir, ignore_errors=True)


def test_a_slow_store_is_not_a_hang_but_silence_and_a_stuck_load_are():
    clock = Clock()
    m = JobMonitor(10, clock, io_timeout_s=60)
    m.observe(hb(0, 100, phase="loading", world=1))
    for _ in range(10):  # a 50 s load: far beyond the hang timeout, bytes still arriving
        clock.t += 5
        current = m.ranks[0].hb
        m.observe(Heartbeat(**{**current.__dict__, "io_bytes": current.io_bytes + 1000}))
    assert m.hung() == []
    clock.t += 30  # no bytes for 30 s: the store is slow or briefly away, not a hang yet
    m.observe(m.ranks[0].hb)
    assert m.hung() == []
    clock.t += 31  # no progress past io_timeout_s: a stuck load
    m.observe(m.ranks[0].hb)
    assert [s.hb.rank for s in m.hung()] == [0]

    m2 = JobMonitor(10, clock, io_timeout_s=60)
    m2.observe(hb(0, 100, phase="loading", world=1))
    clock.t += 11  # no heartbeat at all (SIGSTOPped during the load): caught at the hang timeout
    assert [s.hb.rank for s in m2.hung()] == [0]


def test_a_processs_first_training_step_may_take_the_first_step_timeout_later_ones_the_hang_timeout():
    """torch.compile compiles in the first step (minutes on a big model), heartbeats arriving: not
    a hang before first_step_timeout_s. Once the process has trained a step, the hang timeout
    applies again; a replaced process gets the allowance again (it compiles again)."""
    clock = Clock()
    m = JobMonitor(10, clock, io_timeout_s=60, first_step_timeout_s=120)
    m.observe(hb(0, 100, phase="training", world=1))
    for _ in range(11):  # 110 s in its first step
        clock.t += 10
        m.observe(m.ranks[0].hb)
    assert m.hung() == []
    clock.t += 11
    m.observe(m.ranks[0].hb)
    assert [s.hb.rank for s in m.hung()] == [0]  # past first_step_timeout_s: hung

    m2 = JobMonitor(10, clock, io_timeout_s=60, first_step_timeout_s=120)
    m2.observe(hb(0, 100, phase="training", step=0, world=1))
    clock.t += 30
    m2.observe(hb(0, 100, phase="training", step=1, world=1))  # its first step done: compiled
    clock.t += 11
    m2.observe(m2.ranks[0].hb)
    assert [s.hb.rank for s in m2.hung()] == [0]  # the hang timeout again
    m2.observe(hb(0, 101, phase="training", step=1, world=1, started=2.0))  # a new process
    clock.t += 30
    m2.observe(m2.ranks[0].hb)
    assert m2.hung() == []


def test_a_loading_rank_waiting_for_a_rank_that_never_reported_is_hung_at_the_hang_timeout():
    """Rank 1 was stopped before its first heartbeat; rank 0 loads (bytes arriving), then waits for
    it in a collective. The storage allowance (60 s) is not for that: a hang timeout after rank 1
    has been missing, rank 0's stall counts as a hang, and the report names rank 1."""
    clock = Clock()
    m = JobMonitor(10, clock, io_timeout_s=60)
    m.observe(hb(0, 100, phase="loading"))
    for _ in range(3):  # 15 s of a slow load with progress: not hung, however long rank 1 is away
        clock.t += 5
        current = m.ranks[0].hb
        m.observe(Heartbeat(**{**current.__dict__, "io_bytes": current.io_bytes + 1000}))
        assert m.hung() == []
    assert m.absent_ranks == [1]
    clock.t += 11  # waiting in a collective: heartbeats, no bytes, far below io_timeout_s
    m.observe(m.ranks[0].hb)
    assert [s.hb.rank for s in m.hung()] == [0]

    m2 = JobMonitor(10, clock, io_timeout_s=60)  # both reported: the storage allowance holds
    m2.observe(hb(0, 100, phase="loading"))
    m2.observe(hb(1, 101, phase="loading"))
    clock.t += 30
    m2.observe(m2.ranks[0].hb)
    m2.observe(m2.ranks[1].hb)
    assert m2.hung() == [] and m2.absent_ranks == []


def test_ranks_waiting_for_a_peers_slow_read_are_not_hung_until_the_peer_is():
    """Rank 0 reads shards (the "reading" phase, bytes arriving); rank 1 has its batch and waits
    in the next collective, making no progress of its own: held up by storage, not hung."""
    clock = Clock()
    m = JobMonitor(10, clock, io_timeout_s=60)
    m.observe(hb(0, 100, phase="reading", step=3))
    m.observe(hb(1, 101, phase="training", step=3))
    for _ in range(6):  # 30 s: three hang timeouts
        clock.t += 5
        current = m.ranks[0].hb
        m.observe(Heartbeat(**{**current.__dict__, "io_bytes": current.io_bytes + 1000}))
        m.observe(m.ranks[1].hb)
    assert m.hung() == []
    clock.t += 61  # the read is stuck too (no bytes past the storage limit): both are hung now
    m.observe(m.ranks[0].hb)
    m.observe(m.ranks[1].hb)
    assert sorted(s.hb.rank for s in m.hung()) == [0, 1]


def test_a_rank_held_up_by_a_peers_read_gets_the_hang_timeout_from_when_the_read_ended():
    """The peer's 30 s read ends (it has its batch): the rank that waited for it is not hung at
    that instant (it needs the peer's step to catch up) but only a hang timeout later. The
    race the CI once lost: no progress for 30 s, and the storage allowance gone."""
    clock = Clock()
    m = JobMonitor(10, clock, io_timeout_s=60)
    m.observe(hb(0, 100, phase="reading", step=3))
    m.observe(hb(1, 101, phase="training", step=3))
    for _ in range(6):
        clock.t += 5
        current = m.ranks[0].hb
        m.observe(Heartbeat(**{**current.__dict__, "io_bytes": current.io_bytes + 1000}))
        m.observe(m.ranks[1].hb)
    clock.t += 2  # between two supervisor ticks, rank 0 got its batch
    m.observe(Heartbeat(**{**m.ranks[0].hb.__dict__, "phase": "training"}))
    assert m.hung() == []
    clock.t += 9
    m.observe(m.ranks[0].hb)
    m.observe(m.ranks[1].hb)
    assert m.hung() == []
    clock.t += 2  # a hang timeout since the read ended, and still no step anywhere
    m.observe(m.ranks[0].hb)
    m.observe(m.ranks[1].hb)
    assert sorted(s.hb.rank for s in m.hung()) == [0, 1]


def test_the_storage_phase_limit_grows_with_the_longest_phase_seen():
    clock = Clock()
    m = JobMonitor(10, clock, io_timeout_s=20)
    m.observe(hb(0, 100, phase="checkpointing"))
    clock.t += 15
    m.observe(hb(0, 100, phase="training", step=1))  # a 15 s save
    m.observe(hb(0, 100, phase="checkpointing", step=1))
    assert m.stall_limit("checkpointing") == 45  # 3 x the longest save so far
    assert m.stall_limit("training") == 10


def test_series_of_ranks_that_left_are_removed():
    from service.supervisor.ledger import publish

    clock = Clock()
    m = JobMonitor(10, clock)
    metrics = SupervisorMetrics()
    m.observe(hb(0, 100, world=2))
    m.observe(hb(1, 101, world=2))
    publish(m, metrics)
    assert metrics.registry.get_sample_value("ftdiff_worker_heartbeat_age_seconds", {"rank": "1"}) is not None
    m.observe(hb(0, 100, world=1, step=1))  # shrunk to one rank
    publish(m, metrics)
    assert metrics.registry.get_sample_value("ftdiff_worker_heartbeat_age_seconds", {"rank": "1"}) is None
    assert metrics.registry.get_sample_value("ftdiff_worker_heartbeat_age_seconds", {"rank": "0"}) is not None


def test_preemption_exits_43_only_for_this_runs_own_emergency_commit(tmp_path):
    """A commit after the signal by *another* start (this job was superseded) is no emergency
    checkpoint of this job."""
    import time

    from service.checkpoint.catalog import Catalog
    from service.checkpoint.manifest import FileEntry, Manifest
    from service.checkpoint.storage import open_storage
    from service.supervisor.ending import emergency_commit_problem

    cfg = load_config(None, [f'checkpoint.url="{tmp_path}"'])
    catalog = Catalog(open_storage(str(tmp_path)))
    asked = time.time()

    def commit(step: int, run_id: str) -> None:
        catalog.storage.makedirs(f"step-{step:09d}")
        catalog.storage.write_bytes_atomic(f"step-{step:09d}/.metadata", b"x")
        catalog.write_manifest(Manifest(step, 1, "h", {".metadata": FileEntry(1, "00000000")}, run_id=run_id))

    commit(4, "other")
    assert "another run" in emergency_commit_problem(cfg, "mine", asked)
    commit(5, "mine")
    assert emergency_commit_problem(cfg, "mine", asked) is None
    assert "no emergency checkpoint" in emergency_commit_problem(cfg, "mine", time.time() + 60)


@pytest.mark.multiprocess
def test_local_mode_counts_ranks_gone_together_as_one_crash_and_runs_again_after_a_relaunch():
    import os
    import subprocess
    import sys

    from service.supervisor.launcher import LocalSupervisor

    cfg = load_config(None, ["supervisor.port=0", "metrics.port=0"])
    sup = LocalSupervisor(cfg, None, [], nnodes=1, nproc_per_node=2)
    dead = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(2)]
    for p in dead:
        p.wait()
    for rank, p in enumerate(dead):  # both workers of a torchrun restart are gone at once
        sup.monitor.observe(hb(rank=rank, pid=p.pid))
    sup.on_hung(list(sup.monitor.ranks.values()))
    crashes = sup.metrics.registry.get_sample_value("ftdiff_job_failures_detected_total", {"kind": "worker_crash"})
    assert crashes == 1 and sup.monitor.ranks == {}

    from dataclasses import replace

    from service.supervisor.agent_policy import Phase

    sup.state = replace(sup.state, phase=Phase.RELAUNCHING)  # as after a relaunch (state "restarting")
    sup.metrics.state.state("restarting")
    sup.monitor.observe(hb(rank=0, pid=os.getpid()))
    sup.after_tick()
    state = lambda s: sup.metrics.registry.get_sample_value("ftdiff_job_state", {"ftdiff_job_state": s})  # noqa: E731
    assert state("restarting") == 1  # rank 1 has not reported yet
    sup.monitor.observe(hb(rank=1, pid=os.getppid()))
    sup.after_tick()
    assert state("running") == 1 and state("restarting") == 0


LEAVES_ON_ORDER = """
import pathlib, signal, sys, time
def leave(*_):
    pathlib.Path(sys.argv[1]).write_text("left")  # as the worker leaves its memory snapshot
    sys.exit(44)
signal.signal(signal.SIGUSR1, leave)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
@pytest.mark.parametrize("lost_code", [-9, 128 + 15])  # killed; or ended by SIGTERM through the agent wrapper
def test_a_lost_agent_starts_every_agent_in_a_fresh_round_once_the_survivors_left(tmp_path, lost_code):
    """The old round would wait out the dead agent's keep-alives: every agent starts afresh
    in a new round, all together, once the survivors' workers left their state on the order."""
    import subprocess
    import sys

    from service.supervisor.launcher import Agent, LocalSupervisor

    cfg = load_config(None, ["supervisor.port=0", "metrics.port=0", "supervisor.heartbeat_interval_s=5"])
    sup = LocalSupervisor(cfg, None, [], nnodes=2, nproc_per_node=1)
    launched: list[tuple[int, bool]] = []  # (node, whether the survivor's worker had left by then)
    sup._launch = lambda node: launched.append((node, worker.poll() is not None))  # type: ignore[method-assign]
    marker = tmp_path / "left"
    worker = subprocess.Popen([sys.executable, "-c", LEAVES_ON_ORDER, str(marker)], stdout=subprocess.PIPE, text=True)
    survivor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    lost = subprocess.Popen([sys.executable, "-c", f"import os, sys; sys.exit({lost_code})"
                             if lost_code > 0 else "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    try:
        assert worker.stdout.readline().strip() == "ready"
        lost.wait(10)
        sup.agents = {0: Agent(0, survivor), 1: Agent(1, lost)}
        sup.monitor.observe(hb(rank=0, pid=worker.pid, node="0"))
        sup.monitor.observe(hb(rank=1, pid=lost.pid, node="1"))
        assert sup._handle_agents() is None
        assert sup.state.round == 1 and launched == [(0, True), (1, True)]  # after the survivor left
        assert worker.wait(10) == 44 and marker.read_text() == "left"  # left on the order, not killed
        assert survivor.wait(10) == -9  # the old round's agent is gone
        lost_nodes = sup.metrics.registry.get_sample_value("ftdiff_job_failures_detected_total", {"kind": "lost_node"})
        assert lost_nodes == 1
    finally:
        for p in (worker, survivor):
            if p.poll() is None:
                p.kill()
                p.wait()
        sup.shutdown()


@pytest.mark.multiprocess
def test_an_agent_learns_its_nodes_stuck_processes_and_ends_only_its_own(server, monkeypatch):
    """POST /stuck answers the stuck processes of the node asked about (pid and start time,
    until their order expires); the agent's watch SIGKILLs those that are its descendants
    and the very processes named — not another process that later got the same pid."""
    import subprocess
    import sys
    import time

    from service.node.proc import started_at
    from service.node.stuck_watch import StuckWatch, WatchSettings

    url = f"http://127.0.0.1:{server.port}"
    for body in (b"not json", b'{"node": 3}', b"{}", b'{"node": ""}'):
        assert _post(url + "/stuck", body, "tok", check=False)[0] == 400
    deep = b'{"node": "0", "x": ' + b"[" * 20000 + b"]" * 20000 + b"}"  # nested past the parser's stack
    for path in ("/stuck", "/heartbeat"):
        assert _post(url + path, deep, "tok", check=False)[0] == 400
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    env = {"FTDIFF_NODE": "7", "PATH": "/usr/bin:/bin"}
    mine, peer, newer = (subprocess.Popen(sleeper, env=env) for _ in range(3))
    try:
        deadline = time.monotonic() + 10
        while None in (started_at(mine.pid), started_at(peer.pid), started_at(newer.pid)):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.monitor.observe(hb(rank=0, pid=mine.pid, node="7", started=started_at(mine.pid) + 0.5, world=4))
        server.monitor.observe(hb(rank=1, pid=peer.pid, node="7", started=started_at(peer.pid) + 0.5, world=4))
        # `newer` holds a pid that, says the supervisor, a process started long before had:
        server.monitor.observe(hb(rank=2, pid=newer.pid, node="7", started=time.time() - 3600, world=4))
        server.monitor.observe(hb(rank=3, pid=mine.pid, node="8", started=1.0, world=4))  # the same pid elsewhere
        server.monitor.order_restart(stuck=list(server.monitor.ranks.values()))
        answer = _post(url + "/stuck", b'{"node": "7"}', "tok")[1]
        assert sorted(p for p, _ in answer["stuck"]) == sorted([mine.pid, peer.pid, newer.pid])
        assert _post(url + "/stuck", b'{"node": "9"}', "tok")[1] == {"stuck": []}
        # The agent's view: `mine` and `newer` are its descendants (the test stands in for it).
        monkeypatch.setattr("service.node.stuck_watch.descendants", lambda pid: [mine.pid, newer.pid])
        watch = StuckWatch(WatchSettings(url, "tok", 0.5))
        assert watch.check_once() == [mine.pid]
        assert mine.wait(10) == -9
        assert peer.poll() is None  # named stuck, but not the agent's to end
        assert newer.poll() is None  # its pid was named, but it is a later process
        bad = StuckWatch(WatchSettings(url, "wrong", 0.5))
        with pytest.raises(urllib.error.HTTPError):
            bad._stuck("7")
    finally:
        for p in (mine, peer, newer):
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("reply", [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{", b"garbage\r\n\r\n",
                                   b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"[" * 200000])
def test_the_agent_watch_outlives_any_bad_answer(reply, monkeypatch):
    """A truncated body, a broken status line or a deeply nested one: counted, and asked again."""
    import socket
    import threading
    import time

    from service.node.stuck_watch import StuckWatch, WatchSettings

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    monkeypatch.setattr("service.node.stuck_watch.descendants", lambda pid: [12345])  # one worker,
    monkeypatch.setattr("service.node.stuck_watch.node_of", lambda pid: "0")  # on node 0
    watch = StuckWatch(WatchSettings(f"http://127.0.0.1:{listener.getsockname()[1]}", "tok", 0.05)).start()
    try:
        deadline = time.monotonic() + 15
        while watch.failed < 3:
            assert time.monotonic() < deadline, "the watch stopped asking"
            time.sleep(0.05)
        assert watch._thread.is_alive()
    finally:
        watch.stop()
        stop.set()
        listener.close()


def test_the_agent_watch_follows_the_workers_config(monkeypatch, tmp_path):
    from service.launch_env import LaunchEnv
    from service.node.stuck_watch import watch_settings

    monkeypatch.delenv("FTDIFF_OVERRIDES", raising=False)
    launch = LaunchEnv.read({"FTDIFF_TOKEN": "tok"})
    assert watch_settings(["--log-format", "json"], launch) is None  # no supervisor: nothing to ask
    got = watch_settings(["--set", 'supervisor.url="http://127.0.0.1:9/"', "--set", "supervisor.heartbeat_interval_s=2"],
                         launch)
    assert got is not None and (got.url, got.token, got.interval_s) == ("http://127.0.0.1:9", "tok", 2.0)
    assert watch_settings(["--set", "train.max_steps=oops"], launch) is None  # the workers report that error
    local = LaunchEnv.read({"FTDIFF_TOKEN": "tok", "FTDIFF_SUPERVISOR_PID": "1"})  # its supervisor kills by itself
    assert watch_settings(["--set", 'supervisor.url="http://127.0.0.1:9/"'], local) is None


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_a_stopped_agent_is_treated_as_lost():
    """A SIGSTOPped agent can neither restart its workers nor end when they finish: after the
    silence limit it is killed, and the job counts a lost node and starts a new round."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from service.supervisor.launcher import Agent, LocalSupervisor

    cfg = load_config(None, ["supervisor.port=0", "metrics.port=0", "supervisor.heartbeat_interval_s=0.2"])
    sup = LocalSupervisor(cfg, None, [], nnodes=2, nproc_per_node=1)
    launched: list[int] = []
    sup._launch = launched.append  # type: ignore[method-assign]
    agents = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    try:
        sup.agents = {n: Agent(n, p) for n, p in enumerate(agents)}
        os.kill(agents[1].pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while not launched:
            assert time.monotonic() < deadline, "the stopped agent was never treated as lost"
            assert sup._handle_agents() is None
            time.sleep(0.05)
        assert agents[1].poll() == -9 and agents[0].poll() == -9  # a new round for both
        assert sup.state.round == 1 and launched == [0, 1]
        lost = sup.metrics.registry.get_sample_value("ftdiff_job_failures_detected_total", {"kind": "lost_node"})
        assert lost == 1
    finally:
        for p in agents:
            if p.poll() is None:
                p.kill()
                p.wait()
        sup.shutdown()


def test_a_busy_port_names_itself_and_the_way_out(tmp_path, monkeypatch):
    import socket

    from service.supervisor.local_job import run_local_job

    monkeypatch.setattr("service.logs.setup_logging", lambda *a, **k: None)  # pytest keeps its handlers

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(UserError) as e:
            run_local_job(None, [f'checkpoint.url="{tmp_path}"', f"supervisor.port={port}", "metrics.port=0"], 1, 1)
    assert f"127.0.0.1:{port}" in str(e.value) and "--set supervisor.port=0 --set metrics.port=0" in str(e.value)


def test_relative_speed_is_the_fastest_ranks_compute_time_over_each_ranks():
    from service.metrics import SupervisorMetrics
    from service.supervisor.ledger import publish

    m = JobMonitor(10, Clock())
    for rank, compute, comm in ((0, 0.2, 0.35), (1, 0.5, 0.05), (2, 0.0, 0.0)):  # rank 2: no step yet
        m.observe(Heartbeat(**{**hb(rank, 100 + rank, world=3).__dict__, "compute_s": compute, "comm_s": comm}))
    assert {r: round(s, 3) for r, (_, s) in m.relative_speeds().items()} == {0: 1.0, 1: 0.4}
    metrics = SupervisorMetrics()
    publish(m, metrics)
    node = m.ranks[1].hb.node
    assert metrics.rank_relative_speed.labels(rank="1", node=node)._value.get() == 0.4
    assert metrics.rank_compute_seconds.labels(rank="1", node=node)._value.get() == 0.5
    assert metrics.rank_comm_seconds.labels(rank="0", node=m.ranks[0].hb.node)._value.get() == 0.35
    assert {labels[0] for labels in metrics.rank_comm_seconds._metrics} == {"0", "1"}
    for field in ("compute_s", "comm_s"):
        with pytest.raises(ValueError, match=field):
            Heartbeat.from_json(json.dumps({**hb(0, 100).__dict__, field: -1.0}).encode())
    m.forget(1)
    publish(m, metrics)  # a rank that left takes its series with it
    assert {labels[0] for labels in metrics.rank_comm_seconds._metrics} == {"0"}


def test_a_lost_node_whose_agent_or_processes_report_again_was_cut_off_not_lost():
    """A partition: node b's rank goes silent and is declared lost; later a replacement that
    b's own torchrun agent started reports: b was reachable again, not gone. A fresh node
    under the same name (another agent process) is no such evidence."""
    import dataclasses

    clock = Clock()
    m = JobMonitor(4, clock)
    m.observe(hb(0, 100, node="a"))
    m.observe(dataclasses.replace(hb(1, 200, node="b"), agent="77@5.00"))
    clock.t += 6
    m.observe(hb(0, 100, node="a", step=0))
    assert m.silent_nodes(1.0) == {"b"}
    m.nodes_lost({"b"})
    clock.t += 4
    m.observe(dataclasses.replace(hb(1, 201, node="b", started=50.0), agent="77@9.00"))  # a new pod's agent
    assert m.reconnected == []
    m.nodes_lost({"b"})
    clock.t += 1
    m.observe(dataclasses.replace(hb(1, 202, node="b", started=60.0), agent="77@9.00"))
    assert [node for node, _ in m.reconnected] == ["b"]
    assert m.reconnected[0][1] == pytest.approx(1.0)  # unreachable since its last heartbeat
    m.nodes_lost({"b"})
    m.order_restart()  # its processes were ordered out: their heartbeats are answered, not observed
    m.reachable(dataclasses.replace(hb(1, 202, node="b", started=60.0), agent="77@9.00"))
    assert [node for node, _ in m.reconnected] == ["b", "b"]

