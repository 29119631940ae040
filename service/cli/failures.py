"""Whatever ended a command, as one exit code and one line (``service.errors`` holds the
table; docs/operations.md "Exit codes" documents it)."""

from __future__ import annotations

from service.config import redact_text
from service.errors import EXIT_FAILURE, EXIT_STORAGE, UserError, exit_code_of

_DENIED = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"})


def failure(e: BaseException) -> tuple[int, str]:
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
        code, message = failure(inner)
        if message.startswith("failed: "):
            message = message.replace("failed: ", "checkpoint load failed: ", 1)
        return code, message
    if isinstance(e, PermissionError) or _error_code(e) in _DENIED:
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
