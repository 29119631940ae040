"""Whatever ended a command, as one exit code and one line (``service.errors`` holds the
table; docs/operations.md "Exit codes" documents it).

Only errors raised inside the storage layer (our checkpoint storage, fsspec and its S3 stack,
torch's DCP readers and writers) are storage errors (exit 3). A PermissionError or a
ConnectionError raised anywhere else — writing ``--out``, a closed stdout — is not the
storage's: a local path the user named is a usage error (exit 2).
"""

from __future__ import annotations

import os
import sys

from service.config import redact_text
from service.errors import EXIT_BROKEN_PIPE, EXIT_FAILURE, EXIT_STORAGE, EXIT_USAGE, UserError, exit_code_of

# Modules whose frames make an OSError a storage error.
_STORAGE_MODULES = ("service.checkpoint", "fsspec", "s3fs", "botocore", "aiobotocore", "aiohttp",
                    "torch.distributed.checkpoint")

_DENIED = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"})


def failure(e: BaseException) -> tuple[int, str]:
    """The exit code and the one-line message for whatever ended a command."""
    if isinstance(e, UserError):
        return exit_code_of(e), str(e)
    # Looked up, not imported: an error of a module never imported cannot be one of its
    # classes, and importing them (torch) must not fail here where torch itself is broken.
    pickles = sys.modules.get("service.checkpoint.safe_pickle")
    manifest = sys.modules.get("service.checkpoint.manifest")
    if pickles is not None and isinstance(e, pickles.UnsafeCheckpointError):
        return EXIT_FAILURE, f"unsafe checkpoint file {e.path}: {e.reason}"
    if pickles is not None and isinstance(e, pickles.CorruptCheckpointError):
        return EXIT_FAILURE, f"corrupt checkpoint file {e.path}: {e.reason}"
    if manifest is not None and isinstance(e, manifest.ManifestError):
        return EXIT_FAILURE, f"corrupt checkpoint: {e}"
    inner = _dcp_cause(e)
    if inner is not None:  # DCP's CheckpointException: the first rank's own error
        code, message = failure(inner)
        if message.startswith("failed: "):
            message = message.replace("failed: ", "checkpoint load failed: ", 1)
        return code, message
    if _error_code(e) in _DENIED or (isinstance(e, PermissionError) and _from_storage(e)):
        return EXIT_STORAGE, f"storage access denied: {_gist(e)}"
    if type(e).__module__.startswith(("botocore", "aiobotocore", "aiohttp")) or (
            isinstance(e, ConnectionError) and _from_storage(e)):
        return EXIT_STORAGE, f"storage unreachable: {_gist(e)}"
    if isinstance(e, PermissionError):  # a local path the command was given
        return EXIT_USAGE, f"permission denied: {_gist(e)}"
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


def _from_storage(e: BaseException) -> bool:
    """Whether ``e`` was raised inside the storage layer (a frame of one of its modules)."""
    tb = e.__traceback__
    while tb is not None:
        name = str(tb.tb_frame.f_globals.get("__name__", ""))
        if name.startswith(_STORAGE_MODULES):
            return True
        tb = tb.tb_next
    return False


def stdout_closed() -> bool:
    """Whether the reader of our stdout has gone (``ftdiff ckpt ls ROOT | head -1``)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    try:
        import select

        poller = select.poll()
        poller.register(fd, 0)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows): ask by writing nothing
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            return True
        return False


def stdout_gone() -> int:
    """Stop quietly after the reader of stdout went away: exit 141 (128 + SIGPIPE, what a shell
    reports for a tool SIGPIPE ended), no message, and no "Exception ignored" from the
    interpreter's own flush at exit (stdout now points at /dev/null)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE
