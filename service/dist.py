"""Process-group set-up and teardown for workers launched by torchrun (or alone)."""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from service.launch_env import LaunchEnv
from service.node.proc import start_ticks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    node: str
    run_id: str | None = None
    """Stable across every restart of one run: FTDIFF_RUN_ID (set by ``ftdiff train`` and the
    deploy manifests), else torchrun's --rdzv-id; None when neither names the run."""
    restart_count: int = 0
    """torchrun's restart count of this worker group (TORCHELASTIC_RESTART_COUNT)."""
    collective_timeout_s: float = 300.0
    """train.collective_timeout_s: how long a collective waits for a peer."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(launch: LaunchEnv, collective_timeout_s: float) -> DistInfo:
    """Join the torchrun process group (nccl on CUDA, gloo otherwise), or run alone.

    ``collective_timeout_s`` (train.collective_timeout_s): long enough for a slow checkpoint
    load, short enough that a dead peer turns into an error instead of a silent hang (the
    supervisor's hang detector covers the rest)."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    timeout = datetime.timedelta(seconds=collective_timeout_s)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if "MASTER_ADDR" in os.environ and not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=timeout,
            device_id=device if backend == "nccl" else None,
            store=_restart_safe_store(rank, world_size, timeout),
            rank=rank,
            world_size=world_size,
        )
        log.debug("joined process group: rank %d/%d backend %s", rank, world_size, backend)
    return DistInfo(rank, world_size, local_rank, device, launch.node, run_id_of(launch),
                    int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)), collective_timeout_s)


def run_id_of(launch: LaunchEnv) -> str | None:
    """The id that names this run across restarts: FTDIFF_RUN_ID, else torchrun's --rdzv-id,
    else (torchrun's default id "none" names nothing) the torchrun agent itself — host, pid and
    start time of the parent process, the same for every restart it makes. None outside
    torchrun: every start by hand is a run of its own."""
    if launch.run_id:
        return launch.run_id
    rdzv = launch.rendezvous_id
    if rdzv is None:
        return None
    if rdzv and rdzv != "none":
        return rdzv
    started = start_ticks(launch.agent_pid)
    if started is None:
        return None
    return f"torchrun-{socket.gethostname()}-{launch.agent_pid}-{started}"


def _restart_safe_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, namespaced per torchrun restart.

    With c10d rendezvous, torchrun shares one agent TCPStore with the workers of *every*
    restart, unprefixed: a restarted worker can read a dead peer's address from the previous
    attempt and fail with "Gloo connectFullMesh failed ... Connection refused". Prefixing the
    keys with the restart count avoids that on a single node. Across nodes the per-agent
    restart counts can differ, so multi-node launches should also set
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun (ftdiff's launcher and manifests do),
    which gives every rendezvous round a fresh store.
    """
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        host, port, world_size=world_size, is_master=not shared and rank == 0,
        timeout=timeout, multi_tenant=not shared,
    )
    if not shared:
        return store
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1 and rank == 0:
        log.warning("torchrun shares its rendezvous store across restarts; set "
                    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun on multi-node jobs")
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"ftdiff/restart-{restart}", store)


def new_gloo_group(timeout_s: float) -> dist.ProcessGroup | None:
    """A CPU group for background checkpoint collectives, apart from the training group."""
    if not dist.is_initialized():
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def cleanup_distributed() -> None:
    """Leave the process group; safe to call on every exit path, also after errors."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # teardown after a peer died must not mask the real error
            log.debug("destroy_process_group failed", exc_info=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
