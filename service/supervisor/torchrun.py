"""How the local supervisor starts torchrun: the agent's command line and environment, the
job's geometry check, and the rendezvous store the supervisor hosts for its agents."""

from __future__ import annotations

import socket
import sys

from service.checkpoint.storage import check_shared
from service.config import Config
from service.errors import UserError
from service.launch_env import OVERRIDES_ENV, RDZV_POLL_ENV, overrides_to_env

# A fresh rendezvous store per round, so restarted workers never read a dead peer's address
# (see service.dist._restart_safe_store).
# Agents on one machine look at the rendezvous store every 0.1 s while they wait for one
# another, not every second (see service.node.torch_patches).
AGENT_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", RDZV_POLL_ENV: "0.1"}
# torchrun, run through the wrapper that gives its exit codes meaning (by name: the supervisor
# never imports the worker package).
AGENT_MODULE = "service.node.agent"
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
        sys.executable, "-m", AGENT_MODULE,
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
    check_shared(cfg.checkpoint.url, nnodes * nproc_per_node)
    accum = cfg.train.grad_accum_steps
    for nodes in range(min_nodes or nnodes, nnodes + 1):
        world = nodes * nproc_per_node
        if cfg.train.global_batch_size % (world * accum):
            pieces = f" x train.grad_accum_steps = {accum}" if accum > 1 else ""
            raise UserError(
                f"train.global_batch_size = {cfg.train.global_batch_size} is not divisible by the "
                f"world size {world} ({nodes} nodes x {nproc_per_node} processes){pieces}"
            )


def shutdown_timeout_s(cfg: Config) -> int:
    """How long torchrun waits after SIGTERM before SIGKILLing workers."""
    return int(cfg.checkpoint.grace_s + SHUTDOWN_MARGIN_S)


def rendezvous_store():  # type: ignore[no-untyped-def]
    """A TCPStore on a free loopback port that outlives any agent (torchrun's c10d backend)."""
    import datetime

    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True, wait_for_workers=False,
                    timeout=datetime.timedelta(seconds=60))


def reachable_address(host: str) -> str:
    """The address workers reach the supervisor at (a wildcard bind means loopback)."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
