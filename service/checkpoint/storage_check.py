"""Proving a checkpoint root usable before anything is written: reachable, the credentials may
read, write and delete, and (on S3) conditional writes are honoured. Each failure becomes one
line naming the URL (never a secret) and what to do."""

from __future__ import annotations

import logging
import os
import posixpath
import uuid
from typing import Any

from service.checkpoint.backends.base import HTTP_PRECONDITIONS
from service.checkpoint.storage import Storage, error_code, precondition_failed
from service.errors import UserError

log = logging.getLogger(__name__)


def check_reachable(storage: Storage, write: bool = True, single_writer: bool = False) -> bool:
    """Fail fast, with the URL (never a secret) and a hint, if the root cannot be used;
    return whether the root exists (on object stores: whether anything is under it).

    Endpoint down, DNS, TLS, wrong credentials: StorageError (exit code 3). With ``write``
    (workers, the launcher) a probe object is also created and deleted under the root, so
    read-only credentials fail at start-up rather than at the first save, and a missing
    bucket is a wrong URL (UserError, exit code 2). Without it (the read-only commands) a
    missing root or bucket is no error here: the caller says what "nothing there" means.

    With ``write`` on S3 the probe also proves that the store honours conditional writes, which
    fencing rests on; a store that ignores them is a UserError unless ``single_writer`` (the
    operator's ``checkpoint.single_writer``) accepts running unfenced.
    """
    _check_bucket_name(storage)
    try:
        if storage.backend.object_store:
            # ls, not exists(): s3fs's exists() answers False for a dead endpoint, a
            # refused credential, or a bucket the credentials may list but not HEAD.
            exists = _list_or_missing(storage.fs, storage.root, bucket_must_exist=write)
        elif write:
            storage.makedirs()
            exists = _list_or_missing(storage.fs, storage.root)
        else:
            exists = storage.fs.exists(storage.root) and _list_or_missing(storage.fs, storage.root)
    except _MissingBucket as e:
        raise UserError(f"storage URL {storage.display_url!r}: bucket {str(e)!r} does not exist "
                        "(create it, or fix checkpoint.url)") from None
    except UserError:
        raise
    except Exception as e:  # connection refused, DNS, TLS ... — one line, not a trace
        raise _unusable(storage, e, "read") from None
    if write:
        _probe_write(storage, single_writer)
    return exists


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


PROBE_PREFIX = ".ftdiff-probe-"
# botocore error codes that mean "these credentials may not do this" (s3fs maps most of them to
# PermissionError; a raw ClientError can still surface from other code paths).
_DENIED_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                           "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem"})
_BAD_PATH_ERRNOS = frozenset({"ENOTDIR", "EEXIST", "ENAMETOOLONG", "EISDIR", "EINVAL"})
_DENIED_ERRNOS = frozenset({"EACCES", "EPERM", "EROFS"})
_LOCAL_VERBS = {"read": "create or list", "write": "write in", "delete": "delete in"}


class _MissingBucket(Exception):
    """The bucket of an object-store root does not exist (its name is the message)."""


def _list_or_missing(fs: Any, root: str, bucket_must_exist: bool = False) -> bool:
    """List ``root``: whether it exists. A root (or bucket) that does not exist yet is no
    error here; an empty bucket lists as [] and exists, a prefix with nothing under it not.
    ``bucket_must_exist``: a missing bucket is a wrong URL (UserError), found before anything
    is written (a PUT would create it on stores that auto-create buckets): _MissingBucket."""
    try:
        fs.ls(root, detail=False)
    except FileNotFoundError as e:
        if bucket_must_exist and error_code(e) == "NoSuchBucket":
            raise _MissingBucket(root.split("/", 1)[0]) from None
        return False
    return True


def _probe_write(storage: Storage, single_writer: bool) -> None:
    """Create and delete ``.ftdiff-probe-<uuid>`` under the root (a unique name per process,
    so ranks starting together never collide); errors become UserError/StorageError. The
    object is written with a plain PUT, which never creates a bucket (unlike s3fs's mkdir)."""
    name = _probe_name()
    probe = storage.path(name)
    try:
        storage.fs.pipe_file(probe, b"")
    except FileNotFoundError:
        bucket = storage.root.split("/", 1)[0]
        what = f"bucket {bucket!r} does not exist" if storage.backend.object_store else "its folder cannot be created"
        raise UserError(f"storage URL {storage.display_url!r}: {what} (create it, or fix checkpoint.url)") from None
    except Exception as e:
        raise _unusable(storage, e, "write") from None
    try:
        unhonoured = (_unhonoured_conditions(storage, name)
                      if storage.backend.conditional_writes == HTTP_PRECONDITIONS else [])
    finally:
        try:
            storage.remove(name)
        except Exception as e:
            raise _unusable(storage, e, "delete", left=probe) from None
    if unhonoured and not single_writer:
        raise UserError(
            f"storage URL {storage.display_url!r}: the store ignores conditional writes "
            f"({'; '.join(unhonoured)}), so two starts of this job could both write the root and a "
            "superseded writer could overwrite the newer one's checkpoints; use a store that honours "
            "If-None-Match and If-Match (AWS S3, SeaweedFS, MinIO, recent Ceph RGW), or — only if a "
            "single start of this job can ever run at a time — set checkpoint.single_writer = true")
    if unhonoured:
        log.warning("storage URL %s ignores conditional writes (%s); running unfenced because "
                    "checkpoint.single_writer = true", storage.display_url, "; ".join(unhonoured))


_PROBE_NAMES: dict[int, str] = {}


def _probe_name() -> str:
    """One probe name per process (a process forked from another gets its own): probes that
    cannot be deleted (deletes denied) then leave one object behind per process, not one per
    probe, and ranks probing at the same moment never share one."""
    pid = os.getpid()
    if pid not in _PROBE_NAMES:
        _PROBE_NAMES[pid] = f"{PROBE_PREFIX}{pid}-{uuid.uuid4().hex[:12]}"
    return _PROBE_NAMES[pid]


_STALE_ETAG = '"00000000000000000000000000000000"'


def _unhonoured_conditions(storage: Storage, name: str) -> list[str]:
    """Which of the two conditional writes fencing needs the store ignored, tried on the
    existing probe object: a create-if-absent must fail, a replace-if-match with a stale ETag
    must fail. A store that rejects the condition outright (e.g. 501) does not honour it either."""
    found = []
    try:
        storage.create_exclusive(name, b"second")
        found.append("a create-if-absent (If-None-Match: *) of an existing object succeeded")
    except FileExistsError:
        pass
    except Exception as e:  # noqa: BLE001 — any other answer: the condition is not supported
        found.append(f"a create-if-absent (If-None-Match: *) failed with {type(e).__name__}: {_first_line(e)}")
    try:
        storage.fs.pipe_file(storage.path(name), b"third", IfMatch=_STALE_ETAG)
        found.append("a replace with a stale ETag (If-Match) succeeded")
    except OSError as e:
        if not precondition_failed(e):
            found.append(f"a replace with a stale ETag (If-Match) failed with {type(e).__name__}: {_first_line(e)}")
    return found


# An S3 bucket name: 3-63 lower-case letters, digits, dots and hyphens, starting and ending with a
# letter or digit, not shaped like an IP address, without AWS's reserved prefixes and suffixes.


def _no_credentials(e: BaseException) -> bool:
    """botocore's NoCredentialsError anywhere in the chain (s3fs wraps it, sometimes twice)."""
    seen = 0
    while e is not None and seen < 10:
        if type(e).__name__ == "NoCredentialsError" or "Unable to locate credentials" in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1  # type: ignore[assignment]
    return False


def _check_bucket_name(storage: Storage) -> None:
    """A root no such store accepts (an invalid S3 bucket name, '.'/'..' segments in a key) is
    a wrong URL (exit 2), not an unreachable store."""
    why = storage.backend.check_root(storage.root)
    if why:
        raise UserError(f"storage URL {storage.display_url!r}: {why}; fix checkpoint.url")


def _unusable(storage: Storage, e: BaseException, stage: str, left: str | None = None) -> UserError:
    """The one-line error for a failed check: denied and unreachable are StorageError (the
    URL is right, the access is not), a path that cannot be a folder is a UserError."""
    import errno

    from service.config import redact_text
    from service.errors import StorageError

    url = storage.display_url
    detail = f"{type(e).__name__}: {redact_text(_first_line(e))}"
    local_errno = errno.errorcode.get(e.errno or 0) if storage.backend.on_local_disk and isinstance(e, OSError) else None
    denied = isinstance(e, PermissionError) or error_code(e) in _DENIED_CODES or local_errno in _DENIED_ERRNOS
    if storage.backend.object_store and _no_credentials(e):
        return StorageError(
            f"storage URL {url!r}: no credentials found ({detail}); botocore looked through the whole AWS "
            "credential chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws/credentials, "
            "web identity, container and instance roles) and none gave any: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) where the job runs", permanent=True)
    if denied and storage.backend.on_local_disk:
        # A folder, not credentials: typically an image's non-root user under a root-owned
        # working directory, or a read-only mount.
        return StorageError(
            f"storage URL {url!r}: cannot {_LOCAL_VERBS.get(stage, stage)} the folder as uid {os.getuid()} "
            f"({detail}); make the folder "
            "writable for this user (chown, or mount a writable volume) or set checkpoint.url to a "
            "writable place", permanent=True)
    if denied:
        if stage == "read":
            hint = ("check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the AWS profile)"
                    if storage.backend.object_store else "check the folder's permissions")
            return StorageError(f"storage URL {url!r}: access denied ({detail}); {hint}", permanent=True)
        extra = f"; the probe {posixpath.basename(left)!r} was left behind" if left else ""
        return StorageError(
            f"storage URL {url!r}: {stage} access denied ({detail}): these credentials can read the "
            f"checkpoint root but not {stage} in it, and training must do both{extra}", permanent=True)
    if local_errno in _BAD_PATH_ERRNOS:
        return UserError(f"storage URL {url!r} cannot be used as a folder: {detail}")
    if isinstance(e, FileNotFoundError):
        return UserError(f"storage URL {url!r} does not exist ({detail})")
    return StorageError(f"storage URL {url!r} is unreachable: {detail} (check {storage.backend.where_to_fix_access})")


def missing_folders(storage: Storage) -> list[str]:
    """A local root and its ancestors that do not exist yet, deepest first (none elsewhere):
    what a check that writes there creates, for ``remove_folders`` to take back."""
    if not storage.backend.on_local_disk:
        return []
    missing, path = [], storage.root
    while path and not os.path.lexists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def remove_folders(folders: list[str]) -> None:
    """Remove ``folders`` (deepest first), stopping at the first one that is not empty."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            break
