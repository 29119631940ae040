"""``ftdiff``: train, supervise, inspect/verify/prune checkpoints, export, sample.

Every command ends in one line on stderr (``ftdiff: ...``) and an exit code from one table
(``service.errors``, docs/operations.md "Exit codes"): 0 ok, 1 corrupt or missing checkpoint or
failed run, 2 usage or config, 3 storage unreachable or access denied. ``--verbose`` adds the
traceback. Messages name URLs without their credentials.

The package: ``parser`` (the command line), one module per group of commands
(``train_cmds``, ``preflight`` for ``train --dry-run``, ``ckpt_cmds``, ``tools_cmds`` for
export/sample, ``env_cmd``), and what they share (``common``, ``failures``, ``progress``,
``toml_out``). ``main`` is the console script ``ftdiff`` (``service.cli:main``) and
``python -m service.cli``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import traceback
from collections.abc import Callable, Sequence

from service.cli.common import command_logging
from service.cli.failures import failure as _failure
from service.cli.failures import stdout_closed, stdout_gone
from service.cli.parser import build_parser
from service.config import redact_text

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.verbose = bool(args.global_verbose or getattr(args, "verbose", False))
    func: Callable[[argparse.Namespace], int] = args.func
    # Read commands and train's checks print only their result: library logs are for
    # --verbose. The others (train, supervise, worker) set up their own logs.
    quiet = getattr(args, "quiet", False) or getattr(args, "print_config", False) or getattr(args, "dry_run", False)
    try:
        with command_logging(args.verbose) if quiet else contextlib.nullcontext():
            code = func(args)
            sys.stdout.flush()  # here, not at exit: a closed pipe is then a BrokenPipeError below
            return code
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: BLE001 — CheckpointException is a BaseException
        if isinstance(e, BrokenPipeError) and stdout_closed():  # not a storage socket's
            return stdout_gone()
        code, message = _failure(e)
        print(f"ftdiff: {redact_text(message)}", file=sys.stderr)
        if args.verbose:
            print(redact_text("".join(traceback.format_exception(e))), file=sys.stderr)
        return code
