"""Errors a user can cause, and the exit codes the CLI maps them to."""

from __future__ import annotations

# Exit codes (documented in docs/operations.md; relied on by supervisors and k8s specs).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # bad config, URL, credentials, impossible geometry: nothing was written
EXIT_PREEMPTED = 43  # SIGTERM handled, emergency checkpoint committed


class UserError(Exception):
    """Something the user can fix; printed as one clear message, never as a traceback."""
