"""The torchrun worker entry: parse config, build the trainer, run, always clean up."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from torch.distributed.elastic.multiprocessing.errors import record

from service.config import load_config
from service.errors import EXIT_USAGE, UserError

log = logging.getLogger(__name__)


def build_parser(prog: str = "python -m service.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="ftdiff training worker (run under torchrun)")
    add_worker_args(p)
    return p


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file or preset name (tiny, small, base); default: embedded tiny")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key (repeatable)")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--verbose", action="store_true")


@record
def run_worker(config: str | None, overrides: list[str], log_format: str = "text", verbose: bool = False) -> int:
    # Validate before any process group or file is touched.
    try:
        cfg = load_config(config, overrides)
    except UserError as e:
        print(f"ftdiff: {e}", file=sys.stderr)
        return EXIT_USAGE

    from service.dist import barrier, cleanup_distributed, init_distributed
    from service.logs import setup_logging

    # DCP warns on every save/load when running alone (world size 1); that is intended here.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    info = init_distributed()
    setup_logging(info.rank, log_format, verbose)
    trainer = None
    try:
        from service.train.loop import Trainer

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
        return EXIT_USAGE
    finally:
        if trainer is not None:
            trainer.close()
        cleanup_distributed()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_worker(args.config, args.set, args.log_format, args.verbose)
