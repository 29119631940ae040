"""``ftdiff train`` (and ``--print-config``, ``--dry-run``), ``supervise`` and ``worker``."""

from __future__ import annotations

import argparse
import os
from typing import Any

from service.errors import EXIT_OK


def resolved_config(config: str | None, overrides: list[str]) -> Any:
    """The config ``ftdiff train`` hands its workers: the file, then the overrides the workers
    find in FTDIFF_OVERRIDES. The launcher puts ``--set`` there when there is any, otherwise
    the workers inherit the caller's variable; taking ``worker_env`` from the launcher keeps
    this the config the job really trains with, not a second guess at it."""
    from service.config import load_config, overrides_from_env
    from service.supervisor.launcher import worker_env

    return load_config(config, overrides_from_env({**os.environ, **worker_env(list(overrides))}))


def print_config(args: argparse.Namespace) -> int:
    """The resolved config as TOML, secrets redacted; reads nothing but the config."""
    from service.cli.toml_out import dumps

    cfg = resolved_config(args.config, args.set)
    source = args.config or "embedded default"
    header = (f"ftdiff train: resolved config ({source}, then --set / $FTDIFF_OVERRIDES)\n"
              "secrets are shown as \"***\"; unset keys as comments")
    print(dumps(cfg.redacted_dict(), header=header), end="")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    if args.print_config:
        return print_config(args)
    if args.dry_run:
        from service.cli.preflight import dry_run

        return dry_run(resolved_config(args.config, args.set), args.nnodes, args.nproc_per_node)
    from service.supervisor.launcher import run_local_job

    return run_local_job(
        config=args.config,
        overrides=args.set,
        nnodes=args.nnodes,
        nproc_per_node=args.nproc_per_node,
        log_format=args.log_format,
    )


def cmd_supervise(args: argparse.Namespace) -> int:
    from service.config import load_config
    from service.logs import setup_logging
    from service.supervisor.attach import run_attached

    cfg = load_config(args.config, args.set)
    setup_logging("supervisor", args.log_format, args.verbose,
                  secrets=[cfg.supervisor.token, os.environ.get("FTDIFF_TOKEN")])
    return run_attached(cfg)


def cmd_worker(args: argparse.Namespace) -> int:
    from service.train.entry import run_worker

    return run_worker(args.config, args.set, args.log_format, args.verbose)
