"""The torchrun worker entry: parse config, build the trainer, run, always clean up."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import NoReturn

from torch.distributed.elastic.multiprocessing.errors import record

from service.checkpoint.ownership import FencedError
from service.config import Config, load_config
from service.errors import EXIT_SUPERSEDED, StorageError, UserError, exit_code_of
from service.heartbeat import REFUSED, REFUSED_STORAGE
from service.launch_env import overrides_from_env
from service.train.args import add_worker_args

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


@record
def run_worker(config: str | None, overrides: list[str], log_format: str = "text", verbose: bool = False) -> int:
    # Validate before any process group or file is touched.
    try:
        cfg = worker_config(config, overrides)
    except UserError as e:
        print(f"ftdiff: {e}", file=sys.stderr)
        return exit_code_of(e)

    from service.dist import barrier, cleanup_distributed, init_distributed
    from service.heartbeat import die_with_parent

    if os.environ.get("FTDIFF_SUPERVISOR_PID"):
        # Under `ftdiff train`: go when the torchrun agent goes (it goes with the supervisor),
        # even while stopped or stuck. Plain torchrun keeps its own rules.
        die_with_parent()
    from service.logs import setup_logging

    # DCP warns on every save/load when running alone (world size 1); that is intended here.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    info = init_distributed()
    # The token never reaches a log line, whichever way it came in.
    setup_logging(info.rank, log_format, verbose, secrets=[cfg.supervisor.token, os.environ.get("FTDIFF_TOKEN")])
    trainer = None
    try:
        from service.train.loop import Trainer

        # Everything imported so far (torch, diffusers: millions of objects) lives as long as
        # the process: out of the collector's sight, the exit's final collection takes ~0.3 s
        # instead of ~2.4 s here — time a restart otherwise waits for the survivors to leave.
        gc.freeze()
        trainer = Trainer(cfg, info)
        trainer.install_signal_handlers()
        code = trainer.run()
        trainer.close()
        trainer = None
        # Leave together: a rank that tears its process group down while a peer still
        # talks to it can take that peer down with "connection closed" aborts.
        barrier()
        return code
    except UserError as e:
        log.error("%s", e)
        _refuse(trainer, REFUSED_STORAGE if isinstance(e, StorageError) else REFUSED)
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


def exit_process(run: Callable[[], int]) -> NoReturn:
    """Run ``run`` and end the process with its code, skipping the interpreter's finalization.

    When a worker returns, its work is done: checkpoints drained, files closed, process group
    torn down; its output is flushed below. Finalization would still tear down ~3,300 modules
    and every object in them — 0.1–0.3 s, more in a worker forked from the warm process, where
    each object it touches copies a shared page — while torchrun waits for the survivors of a
    crash to be gone before it restarts anyone. An uncaught exception is printed and ends the
    process with 1, as Python would; SystemExit and KeyboardInterrupt take Python's own way."""
    try:
        code = run()
    except Exception:
        traceback.print_exc()
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
