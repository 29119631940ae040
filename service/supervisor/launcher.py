"""``ftdiff train``: a supervised local job — N torchrun agents (one per simulated node).

torchrun stays the engine: each agent restarts its own crashed workers (``--max-restarts``),
and workers resume from the latest committed checkpoint by themselves; the supervisor adds what
torchrun cannot see: hangs (a SIGSTOPped rank, a rank stuck in a collective), lost agents
(relaunched here), crash loops (exponential backoff, then a report naming the failing rank,
node and traceback), refusals no relaunch can fix (exit 2 or 3), and a clean preemption path.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from service.config import Config
from service.errors import EXIT_DIVERGED, EXIT_FAILURE, EXIT_PREEMPTED, EXIT_STORAGE, EXIT_USAGE
from service.heartbeat import LEAVE_SIGNAL, REFUSED_DIVERGED, REFUSED_STORAGE, Heartbeat, shared_token
from service.launch_env import ZYGOTE_SOCKET_ENV, LaunchEnv, launcher_env
from service.node.proc import die_with_parent
from service.supervisor import procs
from service.supervisor.agent_policy import (
    Finish,
    GiveUp,
    LauncherState,
    Phase,
    Refuse,
    Relaunch,
    budget_renewed,
    failure_kind,
    on_agent_codes,
    on_exclusion,
    on_ranks_fresh,
)
from service.supervisor.core import Supervisor
from service.supervisor.ending import emergency_commit_problem, remove_run_files
from service.supervisor.monitor import RankState
from service.supervisor.report import failure_report
from service.supervisor.torchrun import (
    AGENT_ENV,
    SHUTDOWN_MARGIN_S,
    reachable_address,
    rendezvous_store,
    shutdown_timeout_s,
    torchrun_command,
    worker_args,
    worker_env,
)
from service.vocabulary import FailureKind, RestartReason

log = logging.getLogger(__name__)

@dataclass
class Agent:
    node: int
    proc: subprocess.Popen
    started: float = field(default_factory=time.monotonic)
    stopped_since: float | None = None  # when it was first seen stopped (SIGSTOP)


class LocalSupervisor(Supervisor):
    def __init__(self, cfg: Config, config: str | None, overrides: list[str], nnodes: int,
                 nproc_per_node: int, log_format: str = "text", launch: LaunchEnv | None = None):
        token = shared_token(cfg.supervisor.token, launch or LaunchEnv.read()) or secrets.token_urlsafe(24)
        super().__init__(cfg, token, known_nodes={str(n) for n in range(nnodes)})
        self.nnodes, self.nproc = nnodes, nproc_per_node
        self.log_dir = tempfile.mkdtemp(prefix="ftdiff-torchelastic-")
        # The supervisor hosts the rendezvous store itself: if an agent hosted it, losing that
        # agent's node would take the rendezvous down with it and strand every survivor.
        self.rdzv_store = rendezvous_store()
        self.rdzv = f"127.0.0.1:{self.rdzv_store.port}"
        self.run_id = f"{cfg.run.name}-{os.getpid()}"
        self.cmd_args = worker_args(config, log_format)
        self.overrides = overrides
        self.agents: dict[int, Agent] = {}
        self.state = LauncherState()  # decided by service.supervisor.agent_policy, carried out here
        self.excluded: set[int] = set()  # nodes left out (supervisor.exclude_*)
        # supervisor.prestart_workers: a warm process per node forks the workers (see procs.Zygotes).
        self.zygotes = (procs.Zygotes(self.log_dir, nproc_per_node, log_format)
                        if cfg.supervisor.prestart_workers else None)

    # -- process control ------------------------------------------------------------------------
    def _launch(self, node: int) -> None:
        env = {
            **os.environ, **AGENT_ENV, **worker_env(self.overrides),
            # One run id across every torchrun restart and relaunch (checkpoint.resume = never
            # or a pinned step applies to its first start only; see service.checkpoint.resume);
            # workers stop when this process is gone (see service.heartbeat).
            **launcher_env(node=node, supervisor_url=f"http://{reachable_address(self.cfg.supervisor.host)}:{self.server.port}",
                           token=self.token, run_id=self.run_id, supervisor_pid=os.getpid()),
            # torchrun SIGKILLs workers this long after forwarding SIGTERM (default 30 s):
            # the emergency checkpoint gets checkpoint.grace_s plus a margin.
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(shutdown_timeout_s(self.cfg)),
        }
        if self.zygotes is not None:
            env[ZYGOTE_SOCKET_ENV] = self.zygotes.ensure(node, {**os.environ, **AGENT_ENV})
        cmd = torchrun_command(
            self.cmd_args, self.nnodes, self.nproc, self.rdzv, self.cfg.supervisor.max_restarts,
            self.cfg.supervisor.min_nodes, f"{self.run_id}-r{self.state.round}",
            os.path.join(self.log_dir, f"node{node}"),
            # Agents are store clients; a lost agent is noticed after 3 missed 1 s keep-alives;
            # with a node range, a round closes 2 s after the minimum has joined.
            rdzv_conf="is_host=false,keep_alive_interval=1,keep_alive_max_attempt=3,last_call_timeout=2",
            module=procs.SHIM_MODULE if self.zygotes is not None else "service.train",
        )
        # A session of its own: Ctrl-C reaches this process only, which forwards it (an agent that got
        # it too shut down on its own: taken for a crash and relaunched, or checked too early).
        self.agents[node] = Agent(node, subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent,
                                                         start_new_session=True))  # noqa: PLW1509
        log.info("node %d: torchrun agent pid %d", node, self.agents[node].proc.pid)

    def _stop_agents(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        for agent in self.agents.values():
            if agent.proc.poll() is None:
                agent.proc.send_signal(sig)
                if procs.stopped(agent.proc.pid):  # SIGSTOPped: let it act on the signal
                    procs.signal_pid(agent.proc.pid, signal.SIGCONT)
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
        stuck = [state for state in hung if procs.pid_alive(state.hb.pid)]
        gone = [state for state in hung if state not in stuck and self.monitor.forget(state.hb.rank) is not None]
        if gone:  # silent because gone, not stuck: one crash that torchrun is restarting
            log.warning("worker crash: %s gone", ", ".join(
                f"rank {s.hb.rank} (node {s.hb.node}, pid {s.hb.pid})" for s in gone))
            self.record(FailureKind.WORKER_CRASH, RestartReason.WORKER_CRASH)
        if not stuck:
            return
        now, absent = self.monitor.clock(), ", ".join(map(str, self.monitor.absent_ranks))
        log.error("hang detected on %s%s; restarting the job", ", ".join(s.describe(now) for s in stuck),
                  f" (waiting for rank(s) {absent}, never reported)" if absent else "")
        self.record(FailureKind.HANG, RestartReason.HANG)
        # Silent processes (also ones not flagged yet) cannot act on an order: kill them. One
        # that still heartbeats is waiting (on them) and leaves on its order, leaving its state
        # in the memory tier; whoever is still here a grace later is killed (after_tick).
        states = self.monitor.states()
        silent = {s.hb.pid for s in self.monitor.silent_among(states, self.monitor.silence_s)}
        for pid in silent:
            procs.kill(pid)
        self.monitor.order_restart()
        self._order_out([s.hb.pid for s in states if s.hb.pid not in silent])

    def after_tick(self) -> None:
        self._handle_silence()
        self._leave_out_due_nodes()
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
        if self.state.phase is Phase.RELAUNCHING and world and self.monitor.all_fresh(world):
            self.state = on_ranks_fresh(self.state)
            self.metrics.state.state("running")

    def on_refused(self, hb: Heartbeat) -> int | None:
        self._stop_agents(signal.SIGTERM, timeout=30)
        return {REFUSED_STORAGE: EXIT_STORAGE, REFUSED_DIVERGED: EXIT_DIVERGED}.get(hb.phase, EXIT_USAGE)

    def stop(self) -> int:
        """Forward the signal; workers commit an emergency checkpoint and exit. Exit 43 only
        once that commit is found in storage; otherwise 1, saying why."""
        asked_at = time.time()
        # A node lost just before the signal (a node's preemption and the job's often come
        # together) is relaunched first: otherwise the survivors' steps in memory die with this
        # run. An agent killed a moment ago may not have exited yet: watch for one tick.
        deadline = time.monotonic() + self.tick_s
        while time.monotonic() < deadline and all(a.proc.poll() is None for a in self.agents.values()):
            time.sleep(0.02)
        code = self._handle_agents()
        if code is not None:
            return code  # the job ended meanwhile (finished, or gave up)
        self._let_relaunch_finish()
        log.warning("signal %d: forwarding to the agents for an emergency checkpoint", self.stop_signal)
        self._stop_agents(signal.SIGTERM, timeout=shutdown_timeout_s(self.cfg) + 10)
        problem = emergency_commit_problem(self.cfg, self.run_id, asked_at)
        if problem:
            log.error("preemption: %s", problem)
            print(f"ftdiff: preempted, but {problem}", file=sys.stderr)
            return EXIT_FAILURE
        return EXIT_PREEMPTED

    def _let_relaunch_finish(self) -> None:
        """A stop signal during a relaunch (ours, or torchrun's own after a worker crash not
        seen here yet) would reach the new workers before they load, and the steps the
        survivors left in memory would be lost with this run (another `ftdiff train` is another
        run). So first wait, up to ``SHUTDOWN_MARGIN_S``, until every rank trains again in a
        live process: then the emergency checkpoint commits those steps."""
        crashed = [s for s in self.monitor.states() if not procs.pid_alive(s.hb.pid)]
        if self.state.phase is not Phase.RELAUNCHING and not crashed:
            return
        log.warning("stop requested during a relaunch: letting it finish first (up to %ds), so the "
                    "emergency checkpoint keeps the steps the survivors left in memory", SHUTDOWN_MARGIN_S)
        deadline = time.monotonic() + SHUTDOWN_MARGIN_S
        while time.monotonic() < deadline and all(a.proc.poll() is None for a in self.agents.values()):
            states, world = self.monitor.states(), self.monitor.world_size()
            if world and len(states) >= world and all(
                    s.hb.phase in ("training", "reading") and procs.pid_alive(s.hb.pid) for s in states):
                return
            time.sleep(0.05)

    def shutdown(self) -> None:
        if any(a.proc.poll() is None for a in self.agents.values()):
            self._stop_agents()
        if self.zygotes is not None:
            self.zygotes.stop()
        shutil.rmtree(self.log_dir, ignore_errors=True)
        remove_run_files(self.cfg, self.run_id)

    # -- agents -----------------------------------------------------------------------------------
    def _order_out(self, pids: list[int]) -> list[int]:
        """Send ``LEAVE_SIGNAL`` to those of ``pids`` that are our live descendants; those pids.
        The restart order by heartbeat reaches them too, but a heartbeat interval later."""
        ours = set(procs.descendants(os.getpid()))
        pids = [pid for pid in pids if pid in ours and procs.pid_alive(pid)]
        for pid in pids:
            procs.signal_pid(pid, LEAVE_SIGNAL)
        return pids

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
        """Exit code when the job is over, else None. Carries out ``agent_policy``'s decision
        about the agents' exit codes (relaunch, give up, refuse, finish)."""
        self._end_stopped_agents()
        codes = {n: a.proc.poll() for n, a in self.agents.items()}
        last_commit = self.monitor.last_committed_step
        if budget_renewed(self.state, last_commit):
            log.info("new commit since the last relaunch: the relaunch budget is full again")
        self.state, action = on_agent_codes(self.state, codes, last_commit, self.cfg.supervisor.max_restarts)
        if action is None or isinstance(action, Finish):
            return action.code if action is not None else None
        for node, code in codes.items():
            if code:
                log.error("node %d: torchrun agent exited with %s (%s)", node, code, failure_kind(code))
        if isinstance(action, Refuse):  # workers refused (config; storage denied or gone) before a
            self.record(action.kind)    # heartbeat could say so, e.g. at start-up
            log.error("workers exited %d (see the worker log): not relaunching", action.code)
            self._stop_agents(signal.SIGTERM, timeout=30)
            return action.code
        if isinstance(action, GiveUp):
            self.record(action.kind)
            return self._give_up(action.node, action.code)
        self._relaunch(action)
        return None

    def _relaunch(self, action: Relaunch) -> None:
        for kind in action.also_failed:  # gone in the same check: one restart
            self.metrics.failures_detected.labels(kind=kind.value).inc()
        self.record(action.kind, action.reason)
        # Orphaned workers of a lost agent would hold the old rendezvous: end them. The
        # survivors must restart too (their group is broken): order them out now, which also
        # keeps their disappearance from being counted as separate crashes.
        gone = {str(n) for n in action.failed}
        self._kill_workers(lambda s: s.hb.node in gone)
        survivors = [s.hb.pid for s in self.monitor.ranks.values() if s.hb.node not in gone]
        self.monitor.order_restart()
        delay = self.ledger.backoff_s()
        if delay:
            self.metrics.state.state("backoff")
            log.warning("crash loop (%d failures without a new commit): waiting %.0fs",
                        self.ledger.failures_since_commit, delay)
            self.sleep(delay)  # a stop meanwhile still relaunches: stop() lets that finish first
        self.metrics.state.state("restarting")
        self._new_round(survivors)

    def _leave_out_due_nodes(self) -> None:
        """supervisor.exclude_*: relaunch without the nodes the policy names (a diverged replica,
        a persistently slow rank), while supervisor.min_nodes allows."""
        if not self.exclusion.enabled or self.state.phase is not Phase.RUNNING:
            return
        active = [n for n in range(self.nnodes) if n not in self.excluded]
        due = {n: why for n, why in self.exclusion.due(self.monitor.suspect_nodes(), self.monitor.relative_speeds())
               .items() if n.isdigit() and int(n) in active}
        due = self.exclusion.may_leave(len(active), due, self.cfg.supervisor.min_nodes)
        if not due:
            return
        for node, why in due.items():
            log.error("node %s: %s: leaving it out, relaunching on %d node(s)", node, why.replace("_", " "),
                      len(active) - len(due))
            self.metrics.node_exclusions.labels(node=node, reason=why).inc()
            self.server.known_nodes.discard(node)  # type: ignore[union-attr]  # its late heartbeats: refused
            self.excluded.add(int(node))
            procs.end_tree(self.agents.pop(int(node)).proc)
        self._kill_workers(lambda s: s.hb.node in due)
        if self.zygotes is not None:  # its warm process, once the workers it forked are gone
            self.zygotes.stop(nodes={int(node) for node in due})
        survivors = [s.hb.pid for s in self.monitor.ranks.values() if s.hb.node not in due]
        self.metrics.restarts.labels(reason=RestartReason.NODE_EXCLUDED.value).inc()
        self.failure_costs.diagnosed(RestartReason.NODE_EXCLUDED)
        self.monitor.order_restart()
        self.state = on_exclusion(self.state)
        self._new_round(survivors)

    def _end_stopped_agents(self) -> None:
        """An agent stopped (SIGSTOP, a frozen node) for longer than the silence limit cannot
        watch or restart its workers, nor end when they finish: it is as good as lost, so it
        is killed, and the next check relaunches it like any lost agent."""
        now = time.monotonic()
        for node, agent in self.agents.items():
            if agent.proc.poll() is not None or not procs.stopped(agent.proc.pid):
                agent.stopped_since = None
                continue
            if agent.stopped_since is None:
                agent.stopped_since = now
            elif now - agent.stopped_since > self.monitor.silence_s:
                log.error("node %d: torchrun agent pid %d has been stopped for %.1fs: treating the node "
                          "as lost", node, agent.proc.pid, now - agent.stopped_since)
                agent.proc.kill()
                agent.proc.wait(timeout=10)

    def _new_round(self, survivors: list[int]) -> None:
        """Every agent starts over in a fresh rendezvous round (``<run id>-r<round>``). After
        torchrun gives up its round is closed for good; after a lost agent the old round would
        wait out the dead agent's keep-alives (3 s) and a 1 s poll before it re-forms. First the
        survivors leave their last completed step in the memory tier and go, with their agents;
        then every agent starts together (with a node range, an agent started ahead of the
        others could close a smaller round on its own while a survivor is slow to leave)."""
        # As for any process ordered out (after_tick): one still there after the silence limit is stuck.
        self._let_workers_leave(survivors, self.monitor.silence_s + self.tick_s)
        for agent in self.agents.values():  # their workers go with them (and the zygote's
            if agent.proc.poll() is None:     # forked ones when their shim does)
                procs.end_tree(agent.proc)
        log.warning("relaunching every agent in rendezvous round %d", self.state.round)
        for node in range(self.nnodes):
            if node not in self.excluded:
                self._launch(node)

    def _let_workers_leave(self, pids: list[int], timeout: float) -> None:
        """Order these workers out by signal (known from heartbeats; only ours): each leaves
        its last completed step in the memory tier and exits at once (without a memory tier,
        the signal ends it). Whoever is still there after ``timeout`` is killed with its agent."""
        pids = self._order_out(pids)
        deadline = time.monotonic() + timeout
        while any(procs.pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.02)

    def _give_up(self, node: int, code: int) -> int:
        self.metrics.state.state("failed")
        report = failure_report(self.log_dir, self.monitor, node, code)
        log.error("giving up after %d relaunches:\n%s", self.state.relaunches, report)
        print(report, file=sys.stderr)
        self._stop_agents()
        return EXIT_FAILURE
