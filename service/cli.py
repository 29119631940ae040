"""``ftdiff``: train, supervise, inspect/verify/prune checkpoints, export, sample.

Every subcommand maps user mistakes (UserError) to one message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence

from service.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UserError


def _add_storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--region", help="S3 region (default: AWS_REGION)")


def _resolve(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from service.checkpoint.refs import resolve

    return resolve(args.url, args.endpoint_url, args.region)


def _catalog(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from service.checkpoint.catalog import Catalog
    from service.checkpoint.storage import open_storage

    return Catalog(open_storage(args.url, args.endpoint_url, args.region))


# -- train / worker ---------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
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

    setup_logging("supervisor", args.log_format, args.verbose)
    return run_attached(load_config(args.config, args.set))


def cmd_worker(args: argparse.Namespace) -> int:
    from service.train.entry import run_worker

    return run_worker(args.config, args.set, args.log_format, args.verbose)


# -- ckpt -------------------------------------------------------------------------------------
def cmd_ckpt_ls(args: argparse.Namespace) -> int:
    infos = _catalog(args).describe()
    if args.json:
        print(json.dumps([i.to_json() for i in infos]))
        return EXIT_OK
    if not infos:
        print("(no checkpoints)")
    for i in infos:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(i.time)) if i.time else "-"
        state = "committed" if i.committed else "partial"
        print(f"{i.step:>10}  {state:<9}  {i.bytes:>12}  {when}  {i.path}")
    return EXIT_OK


def cmd_ckpt_show(args: argparse.Namespace) -> int:
    ref = _resolve(args)
    m = ref.manifest
    print(json.dumps({
        "url": ref.url, "step": m.step, "world_size": m.world_size, "samples_seen": m.samples_seen,
        "config_hash": m.config_hash, "versions": m.versions, "time": m.time, "bytes": m.total_bytes,
        "files": {k: {"size": v.size, "crc32c": v.crc32c} for k, v in sorted(m.files.items())},
    }, indent=2))
    return EXIT_OK


def cmd_ckpt_verify(args: argparse.Namespace) -> int:
    from service.checkpoint.catalog import split_checkpoint_url

    root, step = split_checkpoint_url(args.url)
    args.url = root
    problems: list[str] = []
    if step is None:
        # A run's root: its latest committed checkpoint, and the pointer that should name it.
        catalog = _catalog(args)
        committed = catalog.committed_steps()  # a full scan: verify reads everything anyway
        if not committed:
            print(f"no committed checkpoint under {catalog.storage.display_url}", file=sys.stderr)
            return EXIT_FAILURE
        step = committed[-1]
        pointer = catalog.pointer_step()
        if pointer != step:
            problems.append(f"latest pointer names {pointer!r}, but the newest committed step is {step}")
    else:
        catalog = _catalog(args)
    problems += catalog.verify(step)
    where = catalog.storage.url_of(f"step-{step:09d}")
    if problems:
        print(f"CORRUPT {where}", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"OK {where}")
    return EXIT_OK


def cmd_ckpt_prune(args: argparse.Namespace) -> int:
    from service.checkpoint.retention import apply_retention

    if args.keep_last < 1:
        raise UserError("--keep-last must be at least 1 (the newest commit is never deleted)")
    deleted, failed = apply_retention(_catalog(args), args.keep_last, args.keep_every)
    print(json.dumps({"deleted": deleted, "failed": failed}))
    return EXIT_FAILURE if failed else EXIT_OK


# -- export / sample --------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    from service.export import export

    ref = _resolve(args)
    out = export(ref, args.format, args.out, args.weights)
    print(f"exported {args.weights} weights of {ref.url} to {out}")
    return EXIT_OK


def cmd_sample(args: argparse.Namespace) -> int:
    from service.sample import generate, save_grid, unet_from_state
    from service.weights import load_weights

    if args.n < 1:
        raise UserError("--n must be at least 1")
    ref = _resolve(args)
    cfg, state = load_weights(ref, args.weights)
    images = generate(unet_from_state(cfg, state), cfg, args.n, seed=args.seed, steps=args.steps)
    out = save_grid(images, args.out)
    print(f"wrote {out} ({args.n} samples, {args.weights} weights of {ref.url})")
    return EXIT_OK


# -- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from service.train.entry import add_worker_args

    parser = argparse.ArgumentParser(prog="ftdiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run a supervised local job (default: embedded tiny job)")
    add_worker_args(p)
    p.add_argument("--nnodes", type=int, default=1, help="simulated nodes (torchrun agents)")
    p.add_argument("--nproc-per-node", type=int, default=2, help="worker processes per node")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("supervise", help="watch a cluster-launched job (attach mode)")
    add_worker_args(p)
    p.set_defaults(func=cmd_supervise)

    p = sub.add_parser("worker", help="the torchrun worker entry (same as python -m service.train)")
    add_worker_args(p)
    p.set_defaults(func=cmd_worker)

    ckpt = sub.add_parser("ckpt", help="inspect, verify and prune checkpoints").add_subparsers(
        dest="ckpt_command", required=True
    )
    p = ckpt.add_parser("ls", help="list checkpoints under a run's root")
    p.add_argument("url")
    p.add_argument("--json", action="store_true")
    _add_storage_args(p)
    p.set_defaults(func=cmd_ckpt_ls)
    p = ckpt.add_parser("show", help="print a checkpoint's manifest")
    p.add_argument("url", metavar="URL[/step-N]")
    _add_storage_args(p)
    p.set_defaults(func=cmd_ckpt_show)
    p = ckpt.add_parser("verify", help="check every file's size and checksum (exit 1 if corrupt)")
    p.add_argument("url", metavar="URL[/step-N]")
    _add_storage_args(p)
    p.set_defaults(func=cmd_ckpt_verify)
    p = ckpt.add_parser("prune", help="delete old checkpoints (never the newest committed)")
    p.add_argument("url")
    p.add_argument("--keep-last", type=int, required=True)
    p.add_argument("--keep-every", type=int, default=0)
    _add_storage_args(p)
    p.set_defaults(func=cmd_ckpt_prune)

    p = sub.add_parser("export", help="export weights as safetensors or a diffusers folder")
    p.add_argument("url", metavar="URL[/step-N]")
    p.add_argument("--format", choices=("safetensors", "diffusers"), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--weights", choices=("ema", "model"), default="ema")
    _add_storage_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sample", help="render a PNG grid of samples from a checkpoint")
    p.add_argument("url", metavar="URL[/step-N]")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50, help="DDIM sampling steps")
    p.add_argument("--weights", choices=("ema", "model"), default="ema")
    _add_storage_args(p)
    p.set_defaults(func=cmd_sample)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UserError as e:
        print(f"ftdiff: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
