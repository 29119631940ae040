"""``ftdiff``: train, supervise, inspect/verify/prune checkpoints, export, sample.

Every command ends in one line on stderr (``ftdiff: ...``) and an exit code from one table
(``service.errors``, docs/operations.md "Exit codes"): 0 ok, 1 corrupt or missing checkpoint or
failed run, 2 usage or config, 3 storage unreachable or access denied. ``--verbose`` adds the
traceback. Messages name URLs without their credentials.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from service.config import redact_text, redact_url
from service.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_STORAGE,
    BadCheckpointError,
    UserError,
    exit_code_of,
)


def _add_storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--region", help="S3 region (default: AWS_REGION)")
    p.add_argument("--verbose", action="store_true", help="print the traceback of a failure")


def _catalog(url: str, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The catalog of an existing checkpoint root, after checking that the storage answers
    (exit 3 in one line, not a botocore traceback, when it does not)."""
    from service.checkpoint.catalog import Catalog
    from service.checkpoint.storage import open_storage

    storage = open_storage(url, args.endpoint_url, args.region)
    if not storage.check_reachable(write=False):
        raise BadCheckpointError(f"no such checkpoint root {storage.display_url}")
    return Catalog(storage)


def _resolve(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """``URL`` (the root's latest committed checkpoint) or ``URL/step-N`` (N in any padding)."""
    from service.checkpoint.catalog import split_checkpoint_url
    from service.checkpoint.manifest import ManifestError, step_dir
    from service.checkpoint.refs import CheckpointRef

    root, step = split_checkpoint_url(args.url)
    catalog = _catalog(root, args)
    if step is None:
        found = catalog.latest()
        if found is None:
            raise BadCheckpointError(f"no committed checkpoint under {catalog.storage.display_url}")
        return CheckpointRef(catalog, *found)
    try:
        return CheckpointRef(catalog, step, catalog.manifest(step))
    except ManifestError as e:
        raise BadCheckpointError(f"{catalog.storage.display_url}/{step_dir(step)}: {e}") from None


def _shown(ref: Any) -> str:
    return redact_url(ref.url)


def _check_metadata(ref: Any) -> None:
    """Read and check ``.metadata`` before DCP does: torch folds a failure to read it into an
    AssertionError about metadata being None, and the file and the reason get lost."""
    from service.checkpoint.dcp_io import read_verified_file
    from service.checkpoint.manifest import step_dir
    from service.checkpoint.safe_pickle import load_metadata

    storage, rel = ref.catalog.storage, f"{step_dir(ref.step)}/.metadata"
    load_metadata(read_verified_file(storage, rel, ref.manifest.files), storage.path(rel))


@contextlib.contextmanager
def _command_logging(verbose: bool) -> Iterator[None]:
    """Read commands print their result and at most one error line: library log records
    (torch's DCP logs its own tracebacks at WARNING) only appear with --verbose."""
    from service.logs import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    if verbose:
        setup_logging("ftdiff", "text", verbose=True)
    else:
        root.handlers[:] = [logging.NullHandler()]
        root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


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

    cfg = load_config(args.config, args.set)
    setup_logging("supervisor", args.log_format, args.verbose,
                  secrets=[cfg.supervisor.token, os.environ.get("FTDIFF_TOKEN")])
    return run_attached(cfg)


def cmd_worker(args: argparse.Namespace) -> int:
    from service.train.entry import run_worker

    return run_worker(args.config, args.set, args.log_format, args.verbose)


# -- ckpt -------------------------------------------------------------------------------------
def cmd_ckpt_ls(args: argparse.Namespace) -> int:
    infos = _catalog(args.url, args).describe()
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
        "url": _shown(ref), "step": m.step, "world_size": m.world_size, "samples_seen": m.samples_seen,
        "config_hash": m.config_hash, "versions": m.versions, "time": m.time, "bytes": m.total_bytes,
        "files": {k: {"size": v.size, "crc32c": v.crc32c} for k, v in sorted(m.files.items())},
    }, indent=2))
    return EXIT_OK


def cmd_ckpt_verify(args: argparse.Namespace) -> int:
    from service.checkpoint.catalog import split_checkpoint_url
    from service.checkpoint.manifest import step_dir

    root, step = split_checkpoint_url(args.url)
    catalog = _catalog(root, args)
    problems: list[str] = []
    if step is None:
        # A run's root: its latest committed checkpoint, and the pointer that should name it.
        committed = catalog.committed_steps()  # a full scan: verify reads everything anyway
        if not committed:
            raise BadCheckpointError(f"no committed checkpoint under {catalog.storage.display_url}")
        step = committed[-1]
        pointer = catalog.pointer_step()
        if pointer != step:
            problems.append(f"latest pointer names {pointer!r}, but the newest committed step is {step}")
    problems += catalog.verify(step)
    where = f"{catalog.storage.display_url}/{step_dir(step)}"
    if problems:
        print(f"CORRUPT {where}", file=sys.stderr)
        for p in problems:
            print(f"  {redact_text(p)}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"OK {where}")
    return EXIT_OK


def cmd_ckpt_prune(args: argparse.Namespace) -> int:
    from service.checkpoint.retention import apply_retention

    if args.keep_last < 1:
        raise UserError("--keep-last must be at least 1 (the newest commit is never deleted)")
    deleted, failed = apply_retention(_catalog(args.url, args), args.keep_last, args.keep_every)
    print(json.dumps({"deleted": deleted, "failed": failed}))
    return EXIT_FAILURE if failed else EXIT_OK


# -- export / sample --------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    from service.export import export

    ref = _resolve(args)
    _check_metadata(ref)
    out = export(ref, args.format, args.out, args.weights)
    print(f"exported {args.weights} weights of {_shown(ref)} to {out}")
    return EXIT_OK


def cmd_sample(args: argparse.Namespace) -> int:
    from service.sample import check_grid_path, generate, save_grid, unet_from_state
    from service.weights import load_weights

    if args.n < 1:
        raise UserError("--n must be at least 1")
    check_grid_path(args.out)
    ref = _resolve(args)
    _check_metadata(ref)
    cfg, state = load_weights(ref, args.weights)
    images = generate(unet_from_state(cfg, state), cfg, args.n, seed=args.seed, steps=args.steps)
    out = save_grid(images, args.out)
    print(f"wrote {out} ({args.n} samples, {args.weights} weights of {_shown(ref)})")
    return EXIT_OK


# -- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from service.train.entry import add_worker_args

    parser = argparse.ArgumentParser(prog="ftdiff", description=__doc__.splitlines()[0],
                                     epilog="exit codes: 0 ok, 1 corrupt/missing checkpoint or failed run, "
                                            "2 usage/config, 3 storage unreachable or access denied")
    # Its own dest: a subcommand's --verbose default must not reset `ftdiff --verbose CMD`.
    parser.add_argument("--verbose", dest="global_verbose", action="store_true",
                        help="print the traceback of a failure (also accepted after the subcommand)")
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
    p = ckpt.add_parser("ls", help="list checkpoints under a run's root (exit 1 if the root does not exist)")
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


# -- failures: one line and an exit code ------------------------------------------------------
def _failure(e: BaseException) -> tuple[int, str]:
    """The exit code and the one-line message for whatever ended a command."""
    from service.checkpoint.manifest import ManifestError
    from service.checkpoint.safe_pickle import CorruptCheckpointError, UnsafeCheckpointError

    if isinstance(e, UserError):
        return exit_code_of(e), str(e)
    if isinstance(e, UnsafeCheckpointError):
        return EXIT_FAILURE, f"unsafe checkpoint file {e.path}: {e.reason}"
    if isinstance(e, CorruptCheckpointError):
        return EXIT_FAILURE, f"corrupt checkpoint file {e.path}: {e.reason}"
    if isinstance(e, ManifestError):
        return EXIT_FAILURE, f"corrupt checkpoint: {e}"
    inner = _dcp_cause(e)
    if inner is not None:  # DCP's CheckpointException: the first rank's own error
        code, message = _failure(inner)
        return code, message.replace("failed: ", "checkpoint load failed: ", 1) if message.startswith("failed: ") else message
    if isinstance(e, PermissionError) or _error_code(e) in {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
        return EXIT_STORAGE, f"storage access denied: {_gist(e)}"
    if isinstance(e, ConnectionError) or type(e).__module__.startswith(("botocore", "aiobotocore", "aiohttp")):
        return EXIT_STORAGE, f"storage unreachable: {_gist(e)}"
    return EXIT_FAILURE, f"failed: {_gist(e)} (run with --verbose for the traceback)"


def _dcp_cause(e: BaseException) -> BaseException | None:
    """The exception inside torch.distributed.checkpoint's CheckpointException (a
    BaseException holding {rank: (exception, traceback)}), if ``e`` is one."""
    failures = getattr(e, "failures", None) if type(e).__name__ == "CheckpointException" else None
    if not isinstance(failures, dict) or not failures:
        return None
    first = failures[min(failures)]
    return first[0] if isinstance(first, tuple) else first


def _error_code(e: BaseException) -> str | None:
    response = getattr(e, "response", None)
    return str(response.get("Error", {}).get("Code")) if isinstance(response, dict) else None


def _gist(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return redact_text(f"{type(e).__name__}: {lines[0][:300] if lines else ''}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.verbose = bool(args.global_verbose or getattr(args, "verbose", False))
    func: Callable[[argparse.Namespace], int] = args.func
    quiet = args.command in ("ckpt", "export", "sample")  # the others set up their own logs
    try:
        with _command_logging(args.verbose) if quiet else contextlib.nullcontext():
            return func(args)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # CheckpointException is a BaseException
        code, message = _failure(e)
        print(f"ftdiff: {redact_text(message)}", file=sys.stderr)
        if args.verbose:
            print(redact_text("".join(traceback.format_exception(e))), file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
