"""The torchrun worker entry: parse config, build the trainer, run, always clean up."""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import warnings

from torch.distributed.elastic.multiprocessing.errors import record

from service.checkpoint.errors import FencedError
from service.config import Config, load_config
from service.config.advice import config_advice
from service.errors import EXIT_SUPERSEDED, DivergedError, StorageError, UserError, exit_code_of, user_message
from service.heartbeat import REFUSED, REFUSED_DIVERGED, REFUSED_STORAGE
from service.launch_env import LaunchEnv, add_worker_args, overrides_from_env

log = logging.getLogger(__name__)


def build_parser(prog: str = "python -m service.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="ftdiff training worker (run under torchrun)")
    add_worker_args(p)
    return p


def worker_config(config: str | None, overrides: list[str]) -> Config:
    """The worker's config: the file, then the overrides in FTDIFF_OVERRIDES (how launchers
    pass them, secrets included, without putting them on the world-readable command line),
    then ``--set`` (typed by hand, so it wins)."""
    return load_config(config, overrides_from_env() + list(overrides))


def _collective_timeout(cfg: Config, launch: LaunchEnv) -> float:
    return launch.collective_timeout(cfg.train.collective_timeout_s)


@record
def run_worker(config: str | None, overrides: list[str], log_format: str = "text", verbose: bool = False) -> int:
    # Validate before any process group or file is touched.
    launch = LaunchEnv.read()
    try:
        cfg = worker_config(config, overrides)
        collective_timeout_s = _collective_timeout(cfg, launch)
    except UserError as e:
        print(f"ftdiff: {e}", file=sys.stderr)
        return exit_code_of(e)

    from service.dist import barrier, cleanup_distributed, init_distributed
    from service.node.proc import die_with_parent

    if launch.under_local_supervisor:
        # Under `ftdiff train`: go when the torchrun agent goes (it goes with the supervisor),
        # even while stopped or stuck. Plain torchrun keeps its own rules.
        die_with_parent()
    from service.logs import setup_logging

    # DCP warns on every save/load when running alone (world size 1); that is intended here.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    info = init_distributed(launch, collective_timeout_s)
    # The token never reaches a log line, whichever way it came in.
    setup_logging(info.rank, log_format, verbose, secrets=[cfg.supervisor.token, launch.token])
    if info.rank == 0 and info.restart_count == 0:  # said once per job, not per rank or restart
        for line in config_advice(cfg):
            log.warning("config: %s", line)
    trainer = None
    try:
        from service.train.loop import Trainer

        # Everything imported so far (torch, diffusers: millions of objects) lives as long as
        # the process: out of the collector's sight, the exit's final collection takes ~0.3 s
        # instead of ~2.4 s here — time a restart otherwise waits for the survivors to leave.
        gc.freeze()
        trainer = Trainer(cfg, info, launch=launch)
        trainer.install_signal_handlers()
        code = trainer.run()
        trainer.close()
        trainer = None
        # Leave together: a rank that tears its process group down while a peer still
        # talks to it can take that peer down with "connection closed" aborts.
        barrier()
        return code
    except UserError as e:
        log.error("%s", user_message(e))
        _refuse(trainer, REFUSED_STORAGE if isinstance(e, StorageError)
                else REFUSED_DIVERGED if isinstance(e, DivergedError) else REFUSED)
        return exit_code_of(e)  # 2, or 3 when the storage is unreachable or refuses access
    except FencedError as e:
        log.error("stopping: %s", e)
        _refuse(trainer, REFUSED)
        return EXIT_SUPERSEDED
    finally:
        if trainer is not None:
            trainer.close()
        cleanup_distributed()


def _refuse(trainer: object | None, phase: str) -> None:
    """Tell the supervisor (in the goodbye heartbeat) that restarting cannot help: the error is
    the configuration's, the storage's, or another start now owns the checkpoint root."""
    if trainer is not None:
        trainer.phase = phase  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_worker(args.config, args.set, args.log_format, args.verbose)
