"""Errors a user can cause, and the exit codes the CLI maps them to."""

from __future__ import annotations

# Exit codes (documented in docs/operations.md, "Exit codes"; relied on by supervisors, k8s
# specs and scripts — change them only together with that table).
EXIT_OK = 0
EXIT_FAILURE = 1  # a corrupt or missing checkpoint, a failed run, an unexpected error
EXIT_USAGE = 2  # bad arguments, config, URL, impossible geometry: nothing was written
EXIT_SUPERSEDED = 46  # worker: another start of the job now owns the checkpoint root (fenced)
EXIT_STORAGE = 3  # storage unreachable, or access denied (credentials, read-only, policy)
EXIT_PREEMPTED = 43  # SIGTERM handled, emergency checkpoint committed
EXIT_RESTART_ORDERED = 44  # worker: left on the supervisor's restart order (torchrun restarts it)
EXIT_ORPHANED = 45  # worker: its local supervisor or agent died; it must not outlive its job
EXIT_DIVERGED = 47  # training diverged past divergence.max_rollbacks (or with nothing to roll back to)
EXIT_BROKEN_PIPE = 141  # the reader of stdout went away (`| head`): 128 + SIGPIPE, quietly


class UserError(Exception):
    """Something the user can fix; printed as one clear message, never as a traceback.

    ``exit_code`` is what a command exits with when this error ends it; subclasses name the
    cases that scripts must be able to tell apart.
    """

    exit_code = EXIT_USAGE


class StorageError(UserError):
    """The storage cannot be used: endpoint down, DNS, TLS, wrong or read-only credentials.

    Distinct from a wrong URL (a plain UserError): the same command may work once the network
    or the credentials are fixed, so operators and retry loops need to tell the two apart.
    """

    exit_code = EXIT_STORAGE
    # Denied (credentials, policy) or gone (the bucket): waiting will not fix it, unlike an
    # unreachable endpoint, a timeout or throttling.
    permanent = False

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


class BadCheckpointError(UserError):
    """The checkpoint a read command names is missing, not committed, or corrupt.

    Exit code 1, like ``ckpt verify`` finding a corrupt file: "there is no usable checkpoint
    here" is the command's answer, not a mistake in how it was called.
    """

    exit_code = EXIT_FAILURE


class DivergedError(UserError):
    """Training diverged and rolling back cannot help any more (the budget is spent, or no good
    commit is left): the job stops rather than train on garbage, and is not restarted."""

    exit_code = EXIT_DIVERGED


def exit_code_of(error: UserError) -> int:
    """The exit code for a UserError (EXIT_USAGE unless its class says otherwise)."""
    return int(getattr(error, "exit_code", EXIT_USAGE))


def user_message(error: BaseException) -> str:
    """A user error's own line. Raised in a DataLoader worker, it reaches the training process
    re-raised with a "Caught X in DataLoader worker process N" header and the worker's whole
    traceback in its text: only its last line, the error's own, is the user's to read."""
    text = str(error)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    name = type(error).__name__
    head, sep, rest = last.partition(": ")
    return rest if sep and head.split(".")[-1] == name else last
