"""``ftdiff train``: a supervised local job — N torchrun agents (one per simulated node).

torchrun stays the engine: each agent restarts its own crashed workers (``--max-restarts``),
and workers resume from the latest committed checkpoint by themselves. The supervisor adds what
torchrun cannot see: hangs (a SIGSTOPped rank, a rank stuck in a collective), lost agents
(relaunched here), crash loops (exponential backoff, then a report naming the failing rank,
node and traceback), and a clean preemption path for SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from service.checkpoint.catalog import Catalog
from service.checkpoint.storage import open_storage
from service.config import OVERRIDES_ENV, Config, load_config, overrides_to_env
from service.errors import EXIT_FAILURE, EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE, UserError
from service.heartbeat import Heartbeat, die_with_parent, shared_token
from service.metrics import FailureKind, RestartReason
from service.supervisor import procs
from service.supervisor.core import Supervisor
from service.supervisor.monitor import RankState
from service.supervisor.report import failure_report

log = logging.getLogger(__name__)

# A fresh rendezvous store per round, so restarted workers never read a dead peer's address
# (see service.dist._restart_safe_store).
AGENT_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
# Beyond checkpoint.grace_s: time for the last step in flight before the emergency save starts.
SHUTDOWN_MARGIN_S = 15


MONITOR_INTERVAL_S = 0.1


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def torchrun_command(
    cfg_args: list[str], nnodes: int, nproc_per_node: int, rdzv_endpoint: str, max_restarts: int,
    min_nodes: int | None = None, run_id: str = "ftdiff", log_dir: str | None = None,
    rdzv_conf: str | None = None, module: str = "service.train",
) -> list[str]:
    """The torchrun invocation of one agent; the worker is ``-m service.train`` (or the shim
    of pre-started workers, ``procs.SHIM_MODULE``)."""
    node_range = f"{min_nodes}:{nnodes}" if min_nodes and min_nodes < nnodes else str(nnodes)
    extra = [f"--rdzv-conf={rdzv_conf}"] if rdzv_conf else []
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={node_range}",
        f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={rdzv_endpoint}",
        f"--rdzv-id={run_id}",
        f"--max-restarts={max_restarts}",
        f"--monitor-interval={MONITOR_INTERVAL_S}",  # a dead worker is seen this soon at most
        *extra,
    ]
    if log_dir:
        cmd.append(f"--log-dir={log_dir}")
    return cmd + ["-m", module, *cfg_args]


def worker_args(config: str | None, log_format: str) -> list[str]:
    """The worker's command line. ``--set`` overrides never go here: a command line is
    readable by every user of the machine (/proc/*/cmdline), and overrides may carry a token
    or a URL with credentials; they travel in FTDIFF_OVERRIDES (``worker_env``) instead."""
    args = ["--config", config] if config else []
    return args + ["--log-format", log_format]


def worker_env(overrides: list[str]) -> dict[str, str]:
    return {OVERRIDES_ENV: overrides_to_env(overrides)} if overrides else {}


def check_job_geometry(cfg: Config, nnodes: int, nproc_per_node: int) -> None:
    if nnodes < 1 or nproc_per_node < 1:
        raise UserError("--nnodes and --nproc-per-node must be at least 1")
    min_nodes = cfg.supervisor.min_nodes
    if min_nodes is not None and min_nodes > nnodes:
        raise UserError(f"supervisor.min_nodes = {min_nodes} is more than --nnodes = {nnodes}")
    for nodes in range(min_nodes or nnodes, nnodes + 1):
        world = nodes * nproc_per_node
        if cfg.train.global_batch_size % world:
            raise UserError(
                f"train.global_batch_size = {cfg.train.global_batch_size} is not divisible by the "
                f"world size {world} ({nodes} nodes x {nproc_per_node} processes)"
            )


@dataclass
class Agent:
    node: int
    proc: subprocess.Popen
    started: float = field(default_factory=time.monotonic)


class LocalSupervisor(Supervisor):
    def __init__(self, cfg: Config, config: str | None, overrides: list[str], nnodes: int,
                 nproc_per_node: int, log_format: str = "text"):
        token = shared_token(cfg.supervisor.token) or secrets.token_urlsafe(24)
        super().__init__(cfg, token, known_nodes={str(n) for n in range(nnodes)})
        self.nnodes, self.nproc = nnodes, nproc_per_node
        self.log_dir = tempfile.mkdtemp(prefix="ftdiff-torchelastic-")
        # The supervisor hosts the rendezvous store itself: if an agent hosted it, losing that
        # agent's node would take the rendezvous down with it and strand every survivor.
        self.rdzv_store = _rendezvous_store()
        self.rdzv = f"127.0.0.1:{self.rdzv_store.port}"
        self.run_id = f"{cfg.run.name}-{os.getpid()}"
        self.cmd_args = worker_args(config, log_format)
        self.overrides = overrides
        self.agents: dict[int, Agent] = {}
        self.relaunches = 0
        self._recovering = False  # a relaunch is under way: "running" again once all report
        self._commit_at_relaunch: int | None = None
        # Rendezvous round: torchrun closes a run id's rendezvous for good when an agent gives
        # up, so agents relaunched after that join a fresh one (``<run id>-r<round>``).
        self.round = 0
        # supervisor.prestart_workers: a warm process per node forks the workers (see procs.Zygotes).
        self.zygotes = (procs.Zygotes(self.log_dir, nproc_per_node, log_format)
                        if cfg.supervisor.prestart_workers else None)

    # -- process control ------------------------------------------------------------------------
    def _launch(self, node: int) -> None:
        env = {
            **os.environ, **AGENT_ENV, **worker_env(self.overrides),
            "FTDIFF_NODE": str(node),
            "FTDIFF_SUPERVISOR_URL": f"http://{_reachable(self.cfg.supervisor.host)}:{self.server.port}",
            "FTDIFF_TOKEN": self.token,
            # One run across every torchrun restart and relaunch (checkpoint.resume = never or
            # a pinned step applies to its first start only; see service.checkpoint.resume).
            "FTDIFF_RUN_ID": self.run_id,
            # Workers stop when this process is gone (see service.heartbeat).
            "FTDIFF_SUPERVISOR_PID": str(os.getpid()),
            # torchrun SIGKILLs workers this long after forwarding SIGTERM (default 30 s):
            # the emergency checkpoint gets checkpoint.grace_s plus a margin.
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(shutdown_timeout_s(self.cfg)),
        }
        if self.zygotes is not None:
            env[procs.ZYGOTE_SOCKET_ENV] = self.zygotes.ensure(node, {**os.environ, **AGENT_ENV})
        cmd = torchrun_command(
            self.cmd_args, self.nnodes, self.nproc, self.rdzv, self.cfg.supervisor.max_restarts,
            self.cfg.supervisor.min_nodes, f"{self.run_id}-r{self.round}",
            os.path.join(self.log_dir, f"node{node}"),
            # Agents are store clients; a lost agent is noticed after 3 missed 1 s keep-alives;
            # with a node range, a round closes 2 s after the minimum has joined.
            rdzv_conf="is_host=false,keep_alive_interval=1,keep_alive_max_attempt=3,last_call_timeout=2",
            module=procs.SHIM_MODULE if self.zygotes is not None else "service.train",
        )
        self.agents[node] = Agent(node, subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent))
        log.info("node %d: torchrun agent pid %d", node, self.agents[node].proc.pid)

    def _stop_agents(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        for agent in self.agents.values():
            if agent.proc.poll() is None:
                agent.proc.send_signal(sig)
        deadline = time.monotonic() + timeout
        for agent in self.agents.values():
            try:
                agent.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                agent.proc.kill()
                agent.proc.wait(timeout=10)
        self._kill_workers(lambda s: True)

    def _kill_workers(self, which: Callable[[RankState], bool]) -> None:
        """SIGKILL worker processes (known from heartbeats) — ours, by pid."""
        for state in list(self.monitor.ranks.values()):
            if which(state):
                procs.kill(state.hb.pid)

    # -- the supervisor's hooks -------------------------------------------------------------------
    def start(self) -> None:
        log.info("supervisor on 127.0.0.1:%d, metrics on %s; rendezvous %s",
                 self.server.port, self.endpoints.metrics_address, self.rdzv)
        if self.zygotes is not None:  # warm before the first start too, not only for restarts
            for node in range(self.nnodes):
                self.zygotes.ensure(node, {**os.environ, **AGENT_ENV})
            self.zygotes.wait_ready()
        for node in range(self.nnodes):
            self._launch(node)

    def check(self) -> int | None:
        return self._handle_agents()

    def on_hung(self, hung: list[RankState]) -> None:
        stuck, gone = [], []
        for state in hung:
            if procs.pid_alive(state.hb.pid):
                stuck.append(state)
            elif self.monitor.forget(state.hb.rank) is not None:
                gone.append(state)
        if gone:  # silent because gone, not stuck: one crash that torchrun is restarting
            log.warning("worker crash: %s gone", ", ".join(
                f"rank {s.hb.rank} (node {s.hb.node}, pid {s.hb.pid})" for s in gone))
            self.record(FailureKind.WORKER_CRASH, RestartReason.WORKER_CRASH)
        if not stuck:
            return
        desc = ", ".join(f"rank {s.hb.rank} (node {s.hb.node}, pid {s.hb.pid}, step {s.hb.step})" for s in stuck)
        log.error("hang detected: no progress for %.0fs on %s; restarting the job",
                  self.cfg.supervisor.hang_timeout_s, desc)
        self.record(FailureKind.HANG, RestartReason.HANG)
        # Silent processes (also ones not flagged yet) cannot act on an order: kill them. One
        # that still heartbeats is waiting (on them) and leaves on its order, leaving its state
        # in the memory tier; whoever is still here a grace later is killed (after_tick).
        for s in self.monitor.silent_among(self.monitor.states(), self.monitor.silence_s):
            procs.kill(s.hb.pid)
        self.monitor.order_restart()

    def after_tick(self) -> None:
        self._handle_silence()
        overdue = self.monitor.ordered_before(self.monitor.silence_s + self.tick_s)
        if overdue:  # ordered out and still here: stopped or wedged since, or deaf to orders
            ours = set(procs.descendants(os.getpid()))
            for node, pid, started in overdue:
                if pid in ours:
                    log.error("rank process %d (node %s) did not leave on its order: killing it", pid, node)
                    procs.kill(pid)
                self.monitor.drop_order((node, pid, started))
        # Back to "running" once every rank of the relaunched job reports again.
        world = self.monitor.world_size()
        if self._recovering and world and self.monitor.all_fresh(world):
            self._recovering = False
            self.metrics.state.state("running")

    def on_refused(self, hb: Heartbeat) -> int | None:
        self._stop_agents(signal.SIGTERM, timeout=30)
        return EXIT_USAGE

    def stop(self) -> int:
        """Forward the signal; workers commit an emergency checkpoint and exit. Exit 43 only
        once that commit is found in storage; otherwise 1, saying why."""
        asked_at = time.time()
        log.warning("signal %d: forwarding to the agents for an emergency checkpoint", self.stop_signal)
        self._stop_agents(signal.SIGTERM, timeout=shutdown_timeout_s(self.cfg) + 10)
        problem = self._emergency_commit_problem(asked_at)
        if problem:
            log.error("preemption: %s", problem)
            print(f"ftdiff: preempted, but {problem}", file=sys.stderr)
            return EXIT_FAILURE
        return EXIT_PREEMPTED

    def _emergency_commit_problem(self, asked_at: float) -> str | None:
        """None if a checkpoint was committed after ``asked_at``, else what was found."""
        ck = self.cfg.checkpoint
        try:
            found = Catalog(open_storage(ck.url, ck.endpoint_url, ck.region)).latest()
        except Exception as e:  # storage down: the commit cannot be confirmed
            return f"the emergency checkpoint could not be confirmed ({type(e).__name__}: {e})"
        if found is None:
            return "no checkpoint is committed at all"
        step, manifest = found
        if manifest.run_id != self.run_id:
            return (f"the newest commit (step {step}) belongs to another run ({manifest.run_id or 'unknown'}): "
                    "this job was superseded and its emergency checkpoint is not in storage")
        if manifest.time < asked_at:
            return (f"no emergency checkpoint was committed after the stop signal (newest: step {step}, "
                    f"{asked_at - manifest.time:.0f}s before it); up to checkpoint.every_steps steps are lost")
        return None

    def shutdown(self) -> None:
        if any(a.proc.poll() is None for a in self.agents.values()):
            self._stop_agents()
        if self.zygotes is not None:
            self.zygotes.stop()
        shutil.rmtree(self.log_dir, ignore_errors=True)

    # -- agents -----------------------------------------------------------------------------------
    def _handle_silence(self) -> None:
        """Hang detection watches ranks, and a restart order forgets them all: agents stuck in
        rendezvous, or workers stuck before their first heartbeat, leave nothing to watch.
        When no worker has reported for ``startup_timeout_s`` since the agents' launch, the
        last restart order or the last heartbeat, end the agents and whatever they started;
        ``_handle_agents`` then relaunches them (counted, like any lost agent)."""
        alive = [a for a in self.agents.values() if a.proc.poll() is None]
        if not alive:
            return
        since_launch = time.monotonic() - max(a.started for a in self.agents.values())
        silent = min(self.monitor.silent_for(), since_launch)
        if silent <= self.cfg.supervisor.startup_timeout_s:
            return
        log.error("no worker has reported for %.0fs although %d torchrun agent(s) run (stuck in "
                  "rendezvous or start-up?): ending them for a relaunch", silent, len(alive))
        for agent in alive:
            procs.end_tree(agent.proc)

    def _handle_agents(self) -> int | None:
        """Exit code when the job is over, else None. Relaunches lost or failed agents."""
        codes = {n: a.proc.poll() for n, a in self.agents.items()}
        if all(c == 0 for c in codes.values()):
            return EXIT_OK
        if self.monitor.last_committed_step != self._commit_at_relaunch and self.relaunches:
            log.info("new commit since the last relaunch: the relaunch budget is full again")
            self.relaunches = 0
        for node, code in codes.items():
            if code is None or code == 0:
                continue
            lost = code < 0  # killed by a signal: the node is gone, not the program
            kind = FailureKind.LOST_NODE if lost else FailureKind.AGENT_FAILED
            log.error("node %d: torchrun agent exited with %s (%s)", node, code, kind)
            if self.relaunches >= self.cfg.supervisor.max_restarts:
                self.record(kind)
                return self._give_up(node, code)
            self.relaunches += 1
            self._commit_at_relaunch = self.monitor.last_committed_step
            self.record(kind, RestartReason.LOST_NODE if lost else RestartReason.JOB_FAILED)
            # Orphaned workers of a lost agent would hold the old rendezvous: end them. The
            # survivors must restart too (their group is broken): order them out now, which
            # also keeps their disappearance from being counted as separate crashes.
            self._kill_workers(lambda s, n=node: s.hb.node == str(n))
            self.monitor.order_restart()
            delay = self.ledger.backoff_s()
            self._recovering = True
            if delay:
                self.metrics.state.state("backoff")
                log.warning("crash loop (%d failures without a new commit): waiting %.0fs",
                            self.ledger.failures_since_commit, delay)
                if self.sleep(delay):
                    return None
            self.metrics.state.state("restarting")
            if lost:  # its rendezvous is still open: the node rejoins the others
                self._launch(node)
                continue
            # torchrun gave up, which closes this round's rendezvous for good: every agent
            # starts over in a fresh round.
            for agent in self.agents.values():
                if agent.proc.poll() is None:
                    procs.end_tree(agent.proc)
            self._kill_workers(lambda s: True)
            self.round += 1
            log.warning("relaunching every agent in rendezvous round %d", self.round)
            for n in range(self.nnodes):
                self._launch(n)
            return None
        return None

    def _give_up(self, node: int, code: int) -> int:
        self.metrics.state.state("failed")
        report = failure_report(self.log_dir, self.monitor, node, code)
        log.error("giving up after %d relaunches:\n%s", self.relaunches, report)
        print(report, file=sys.stderr)
        self._stop_agents()
        return EXIT_FAILURE


def _reachable(host: str) -> str:
    """The address workers use for a supervisor bound to ``host`` (a wildcard means loopback)."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def shutdown_timeout_s(cfg: Config) -> int:
    """How long torchrun waits after SIGTERM before SIGKILLing workers."""
    return int(cfg.checkpoint.grace_s + SHUTDOWN_MARGIN_S)


def _rendezvous_store():  # type: ignore[no-untyped-def]
    """A TCPStore on a free loopback port that outlives any agent (torchrun's c10d backend)."""
    import datetime

    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True, wait_for_workers=False,
                    timeout=datetime.timedelta(seconds=60))


def run_local_job(
    config: str | None, overrides: list[str], nnodes: int, nproc_per_node: int, log_format: str = "text",
) -> int:
    """Validate, then supervise the job until max_steps is committed (0) or it gives up."""
    from service.logs import setup_logging

    cfg = load_config(config, overrides)  # validate before starting anything
    # The token never reaches a log line, whichever way it came in.
    setup_logging("supervisor", log_format, secrets=[cfg.supervisor.token, os.environ.get("FTDIFF_TOKEN")])
    check_job_geometry(cfg, nnodes, nproc_per_node)
    # Storage mistakes fail here, once, instead of in every worker of every restart.
    ck = cfg.checkpoint
    open_storage(ck.url, ck.endpoint_url, ck.region).check_reachable()
    try:
        supervisor = LocalSupervisor(cfg, config, overrides, nnodes, nproc_per_node, log_format)
    except OSError as e:
        raise UserError(f"cannot listen on supervisor.port/metrics.port: {e}") from None
    return supervisor.run()

