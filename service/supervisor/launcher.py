"""``ftdiff train``: run a local job as torchrun agents (one per simulated node).

torchrun stays the engine: each agent restarts its own workers (``--max-restarts``) and the
workers resume from the latest committed checkpoint by themselves.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

from service.config import Config, load_config
from service.errors import EXIT_FAILURE, EXIT_USAGE, UserError

log = logging.getLogger(__name__)

# A fresh rendezvous store per round, so restarted workers never read a dead peer's address
# (see service.train.distributed._restart_safe_store).
AGENT_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def torchrun_command(
    cfg_args: list[str], nnodes: int, nproc_per_node: int, rdzv_endpoint: str, max_restarts: int,
    min_nodes: int | None = None, run_id: str = "ftdiff",
) -> list[str]:
    """The torchrun invocation of one agent; the worker is ``-m service.train``."""
    node_range = f"{min_nodes}:{nnodes}" if min_nodes and min_nodes < nnodes else str(nnodes)
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={node_range}",
        f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={rdzv_endpoint}",
        f"--rdzv-id={run_id}",
        f"--max-restarts={max_restarts}",
        "-m", "service.train", *cfg_args,
    ]


def worker_args(config: str | None, overrides: list[str], log_format: str) -> list[str]:
    args = ["--config", config] if config else []
    for item in overrides:
        args += ["--set", item]
    return args + ["--log-format", log_format]


def run_local_job(
    config: str | None, overrides: list[str], nnodes: int, nproc_per_node: int, log_format: str = "text",
) -> int:
    """Start ``nnodes`` agents on loopback and wait; SIGTERM/SIGINT are forwarded to them."""
    from service.logs import setup_logging

    setup_logging(0, log_format)
    cfg: Config = load_config(config, overrides)  # validate before starting anything
    if nnodes < 1 or nproc_per_node < 1:
        raise UserError("--nnodes and --nproc-per-node must be at least 1")
    min_nodes = cfg.supervisor.min_nodes
    if min_nodes is not None and min_nodes > nnodes:
        raise UserError(f"supervisor.min_nodes = {min_nodes} is more than --nnodes = {nnodes}")
    world = nnodes * nproc_per_node
    if cfg.train.global_batch_size % world:
        raise UserError(
            f"train.global_batch_size = {cfg.train.global_batch_size} is not divisible by the world "
            f"size {world} (= {nnodes} nodes x {nproc_per_node} processes)"
        )
    endpoint = f"127.0.0.1:{free_port()}"
    cmd = torchrun_command(
        worker_args(config, overrides, log_format), nnodes, nproc_per_node, endpoint,
        cfg.supervisor.max_restarts, min_nodes, run_id=f"{cfg.run.name}-{os.getpid()}",
    )
    agents = [
        subprocess.Popen(cmd, env={**os.environ, **AGENT_ENV, "FTDIFF_NODE": str(i)}) for i in range(nnodes)
    ]
    log.info("started %d torchrun agent(s), rendezvous at %s", nnodes, endpoint)

    def forward(signum: int, _frame: object) -> None:
        for agent in agents:
            if agent.poll() is None:
                agent.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [agent.wait() for agent in agents]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        deadline = time.monotonic() + 30
        for agent in agents:
            if agent.poll() is None:
                agent.terminate()
                agent.wait(timeout=max(1, deadline - time.monotonic()))
    worst = next((c for c in codes if c != 0), 0)
    if worst:
        log.error("job failed: agent exit codes %s", codes)
        return worst if worst in (EXIT_USAGE,) else (worst if worst > 0 else EXIT_FAILURE)
    return 0
