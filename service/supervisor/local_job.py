"""`ftdiff train`: validate once, record the run's status, and supervise the job locally."""

from __future__ import annotations

import logging
from pathlib import Path

from service.checkpoint.start_plan import plan_start
from service.checkpoint.storage import Storage, open_storage
from service.checkpoint.storage_check import check_reachable, missing_folders, remove_folders
from service.config import Config, load_config
from service.config.paths import local_path, run_dir
from service.errors import EXIT_FAILURE, EXIT_USAGE, UserError
from service.launch_env import LaunchEnv
from service.supervisor.launcher import LocalSupervisor
from service.supervisor.run_status import RunStatus
from service.supervisor.torchrun import check_job_geometry

log = logging.getLogger(__name__)


def run_local_job(
    config: str | None, overrides: list[str], nnodes: int, nproc_per_node: int, log_format: str = "text",
) -> int:
    """Validate, then supervise the job until max_steps is committed (0) or it gives up."""
    from service.logs import setup_logging

    cfg = load_config(config, overrides)  # validate before starting anything
    launch = LaunchEnv.read()
    launch.collective_timeout(cfg.train.collective_timeout_s)  # as the workers will (a bad old variable)
    # The token never reaches a log line, whichever way it came in.
    setup_logging("supervisor", log_format, secrets=[cfg.supervisor.token, launch.token])
    check_job_geometry(cfg, nnodes, nproc_per_node)
    # Storage mistakes and a resume the workers would refuse (a changed architecture or other
    # math, a fork's rules) fail here, once, before any process starts or anything is written.
    ck = cfg.checkpoint
    storage = open_storage(ck.url, ck.endpoint_url, ck.region)
    created = missing_folders(storage)
    check_reachable(storage, single_writer=ck.single_writer)
    try:
        _refuse_what_workers_would(cfg, storage)
    except UserError:
        remove_folders(created)  # a refused start leaves no empty root behind
        raise
    try:
        supervisor = LocalSupervisor(cfg, config, overrides, nnodes, nproc_per_node, log_format, launch)
    except OSError as e:
        sup, met = cfg.supervisor, cfg.metrics
        raise UserError(
            f"cannot listen on supervisor {sup.host}:{sup.port} or metrics {met.host}:{met.port} ({e}); "
            "another job may be using them: pass --set supervisor.port=0 --set metrics.port=0 to pick "
            "free ports") from None
    # A status in the run folder only where that folder is the run's own: runs/<name>/ for a
    # remote root, or the parent of a local root named "checkpoints" (a root named otherwise may
    # share its parent with other runs).
    local = local_path(ck.url)
    status = (RunStatus(run_dir(cfg), cfg.run.name, ck.url, cfg.train.max_steps)
              if local is None or Path(local).name == "checkpoints" else None)
    if status is not None:
        status.started()
    code = EXIT_FAILURE
    try:
        code = supervisor.run()
        return code
    finally:
        if status is not None:
            status.ended(code)
        if code == EXIT_USAGE:  # the workers refused (a fork's parent unloadable): an untouched
            remove_folders(created)  # root goes, as after a refusal here (only empty folders do)


def _refuse_what_workers_would(cfg: Config, storage: Storage) -> None:
    """The workers' start rules without the data (whose identity needs it read: they check
    that): a refusal here is the one they would print on every rank after the process group."""
    try:
        plan_start(cfg, storage)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - storage trouble after the probe passed: the workers' to meet
        log.debug("start plan not checked here (%s: %s); the workers check it", type(e).__name__, e)
