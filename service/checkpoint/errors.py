"""The checkpoint layer's errors, in one place: what callers catch to tell a bad checkpoint
(fall back to an older one), a fenced writer (stop) and a failed final save apart."""

from __future__ import annotations


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file does not match its manifest entry (or cannot be what DCP wrote)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class UnsafeCheckpointError(CorruptCheckpointError):
    """A checkpoint file holds a pickle that loading would have to run code for.

    A subclass of ``CorruptCheckpointError`` so that the callers treat it as they treat any
    other bad checkpoint (report it, fall back to an older one), never as a reason to retry
    with a more permissive load.
    """


class ManifestError(ValueError):
    """The manifest is missing, unparsable or inconsistent with its folder."""


class FencedError(RuntimeError):
    """A newer incarnation owns the root: this writer must not change anything in it."""


class CheckpointNotCommitted(RuntimeError):
    """The final or emergency checkpoint could not be committed."""


class MemoryRecoveryError(RuntimeError):
    """Loading an agreed snapshot failed after the registry was partly changed; the snapshot
    was removed, so the next start resumes from the object store."""
