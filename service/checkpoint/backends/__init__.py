"""Storage backends: one module per kind of store, one small interface (``base.Backend``).

A backend answers for its store what the checkpoint code would otherwise ask with protocol
tests: whether it is an object store, whether its files are on this machine's disk (read in
place, fsync), how many upload streams a rank should use, how a create-if-absent and a
replace-if-unchanged are done and whether they need proving, and how deletes are checked.
A new backend is its module plus one line in ``BACKENDS``; any other fsspec protocol gets the
generic ``Backend``.
"""

from __future__ import annotations

from service.checkpoint.backends.base import Backend
from service.checkpoint.backends.local import LocalBackend
from service.checkpoint.backends.s3 import S3Backend

BACKENDS: tuple[type[Backend], ...] = (LocalBackend, S3Backend)


def backend_class(protocol: str) -> type[Backend]:
    """The backend of an fsspec protocol (the generic one for protocols no module claims)."""
    return next((cls for cls in BACKENDS if protocol in cls.protocols), Backend)
