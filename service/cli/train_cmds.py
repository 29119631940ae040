"""``ftdiff train`` (and ``--print-config``, ``--dry-run``), ``supervise`` and ``worker``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from service.errors import EXIT_OK, UserError


def job_overrides(overrides: list[str]) -> list[str]:
    """The overrides of a job started here: the caller's FTDIFF_OVERRIDES, then ``--set`` (typed
    by hand, so it wins) — what the supervisor uses itself and hands its workers, whole."""
    from service.launch_env import overrides_from_env

    return overrides_from_env() + list(overrides)


def resolved_config(config: str | None, overrides: list[str]) -> Any:
    """The config ``ftdiff train`` runs with, and its workers train with."""
    from service.config import load_config

    return load_config(config, job_overrides(overrides))


def check_fork_root(cfg: Any, parent: str) -> None:
    """A fork writes a root of its own: never the parent's."""
    from service.checkpoint.catalog import split_checkpoint_url
    from service.checkpoint.storage import open_storage

    ck = cfg.checkpoint
    root, _ = split_checkpoint_url(parent)
    parent_root = open_storage(root, ck.endpoint_url, ck.region)
    if parent_root.same_root(open_storage(ck.url, ck.endpoint_url, ck.region)) or _inside(ck.url, root):
        raise UserError(f"--from {parent}: the fork would write into its parent's root ({ck.url}); give it a name "
                        "of its own (--set run.name=NEW, so it lives under runs/NEW/) or a checkpoint.url")


def _inside(child: str, parent: str) -> bool:
    """Whether root ``child`` is a folder inside root ``parent`` (however either is spelled)."""
    from service.config.paths import canonical_root

    return canonical_root(child).startswith(canonical_root(parent) + "/")


def weights_of(args: argparse.Namespace) -> Path | None:
    """--from URL --weights-only: the parent's EMA weights as a diffusers model folder in the new
    run's directory (model.init_from then starts the run from them; its own restarts resume its
    own checkpoints). Written once per parent checkpoint. A run that has commits already keeps
    the folder it started from (the same command again continues it, even after the parent
    trained on or was deleted). The weights' fit is checked first; a dry run stops there: None, nothing written."""
    from service.checkpoint.catalog import Catalog
    from service.checkpoint.collectives import CHECKPOINT_ERRORS, describe_error, error_cause
    from service.checkpoint.errors import CorruptCheckpointError, ManifestError
    from service.checkpoint.storage import open_storage
    from service.cli.common import resolve_ref
    from service.config.paths import run_dir
    from service.export import check_init_fit, export_init_weights, shown_ref

    cfg = resolved_config(args.config, args.set)
    ck = cfg.checkpoint
    own = Catalog(open_storage(ck.url, ck.endpoint_url, ck.region)).latest()
    started_from = own[1].config.get("model", {}).get("init_from") if own is not None else None
    if isinstance(started_from, str) and Path(started_from).is_dir():
        return Path(started_from)
    ref = resolve_ref(argparse.Namespace(url=args.from_url, endpoint_url=ck.endpoint_url, region=ck.region))
    check_init_fit(ref, cfg)  # here, before any worker: one message, not one per rank
    if args.dry_run:
        return None
    try:
        return export_init_weights(ref, run_dir(cfg) / "init-weights")
    except CHECKPOINT_ERRORS as e:
        if not isinstance(error_cause(e), (CorruptCheckpointError, ManifestError)):
            raise
        # No loadable checkpoint at start-up: exit 2, as the workers say it for a full fork.
        root = ref.catalog.storage.display_url
        raise UserError(f"--weights-only: the weights of {shown_ref(ref)} could not be loaded: {describe_error(e)}\n"
                        f"Run `ftdiff ckpt verify {root}`; `ftdiff ckpt ls {root}` lists its other checkpoints: "
                        "start from one of those (`--from <its URL>`).") from None


def print_config(args: argparse.Namespace) -> int:
    """The resolved config as TOML, secrets redacted; reads nothing but the config."""
    from service.cli.toml_out import dumps
    from service.config.loading import resolve_file_relative

    cfg = resolved_config(args.config, args.set)
    source = args.config or "embedded default"
    header = (f"ftdiff train: resolved config ({source}, then --set / $FTDIFF_OVERRIDES)\n"
              "secrets are shown as \"***\"; unset keys as comments; paths absolute (a saved copy means\n"
              "the same wherever it is kept: a config file's relative paths are relative to its folder)")
    body = cfg.redacted_dict()
    resolve_file_relative(body, Path.cwd())  # the working directory's paths, as this command meant them
    print(dumps(body, header=header), end="")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    if args.weights_only and not args.from_url:
        raise UserError("--weights-only takes the weights of the checkpoint --from names: add --from URL")
    if args.from_url:
        if resolved_config(args.config, args.set).checkpoint.resume != "auto":
            raise UserError("--from and checkpoint.resume both say where to start: keep one")
        if args.weights_only:
            if resolved_config(args.config, args.set).model.init_from:
                raise UserError("--weights-only and model.init_from both say which weights to start from: keep one")
            check_fork_root(resolved_config(args.config, args.set), args.from_url)
            weights = None if args.print_config else weights_of(args)
            if weights is not None:
                args.set = [*args.set, f"model.init_from={json.dumps(str(weights))}"]
        else:
            args.set = [*args.set, f"checkpoint.resume={json.dumps(args.from_url)}"]
            check_fork_root(resolved_config(args.config, args.set), args.from_url)
    if args.print_config:
        return print_config(args)
    from service.cli.processes import processes_per_node

    nproc = processes_per_node(args.nproc_per_node)
    if args.dry_run:
        from service.cli.preflight import dry_run

        return dry_run(resolved_config(args.config, args.set), args.nnodes, nproc)
    from service.supervisor.local_job import run_local_job

    return run_local_job(
        config=args.config,
        overrides=job_overrides(args.set),
        nnodes=args.nnodes,
        nproc_per_node=nproc,
        log_format=args.log_format,
    )


def cmd_supervise(args: argparse.Namespace) -> int:
    from service.config import load_config
    from service.launch_env import LaunchEnv
    from service.logs import setup_logging
    from service.supervisor.attach import run_attached

    cfg = load_config(args.config, job_overrides(args.set))
    launch = LaunchEnv.read()
    setup_logging("supervisor", args.log_format, args.verbose, secrets=[cfg.supervisor.token, launch.token])
    return run_attached(cfg, launch)


def cmd_worker(args: argparse.Namespace) -> int:
    from service.train.entry import run_worker

    return run_worker(args.config, args.set, args.log_format, args.verbose)
