"""What every ``ftdiff`` command shares: opening a checkpoint root, naming one checkpoint,
quiet library logs, and the human forms of sizes and times.

Kept apart from the commands so that each command module imports only this and the layers
below it (no module of the package imports the package itself: no cycles).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.config import redact_url
from service.errors import BadCheckpointError, UserError
from service.logs import utc_text


def add_storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--region", help="S3 region (default: AWS_REGION)")
    p.add_argument("--verbose", action="store_true", help="print the traceback of a failure")


def open_catalog(url: str, args: argparse.Namespace) -> Any:
    """The catalog of an existing checkpoint root, after checking that the storage answers
    (exit 3 in one line, not a botocore traceback, when it does not)."""
    from service.checkpoint.catalog import Catalog
    from service.checkpoint.storage import open_storage
    from service.checkpoint.storage_check import check_reachable

    storage = open_storage(url, args.endpoint_url, args.region)
    if not check_reachable(storage, write=False):
        raise BadCheckpointError(f"no such checkpoint root {storage.display_url}")
    if not storage.backend.object_store and storage.fs.isfile(storage.root):
        raise UserError(f"{storage.display_url} is a file, not a checkpoint root "
                        "(a folder of step-N folders)")
    catalog = Catalog(storage)
    if not catalog.step_folders():  # a run's folder (runs/NAME) given for its root (runs/NAME/checkpoints)?
        inner = open_storage(f"{url.rstrip('/')}/checkpoints", args.endpoint_url, args.region)
        if Catalog(inner).step_folders():
            raise UserError(f"{storage.display_url} is a run's folder, not its checkpoint root: its "
                            f"checkpoints are in {inner.display_url}")
    return catalog


def resolve_ref(args: argparse.Namespace) -> Any:
    """``URL`` (the root's latest committed checkpoint) or ``URL/step-N`` (N in any padding)."""
    from service.checkpoint.catalog import split_checkpoint_url
    from service.checkpoint.errors import ManifestError
    from service.checkpoint.manifest import step_dir
    from service.checkpoint.refs import CheckpointRef

    root, step = split_checkpoint_url(args.url)
    catalog = open_catalog(root, args)
    if step is None:
        found = catalog.latest()
        if found is None:
            raise BadCheckpointError(f"no committed checkpoint under {catalog.storage.display_url}")
        return CheckpointRef(catalog, *found)
    try:
        return CheckpointRef(catalog, step, catalog.manifest(step))
    except ManifestError as e:
        raise BadCheckpointError(f"{catalog.storage.display_url}/{step_dir(step)}: {e}") from None


def check_out_path(out: str, flag: str = "--out", folder: bool = False) -> None:
    """Refuse (exit 2, naming ``flag``) an output path that cannot be written, before any
    checkpoint is read: its nearest existing ancestor must be a directory this process can
    create files in (tried for real: root passes os.access checks that the filesystem then
    refuses, as under /sys or on a read-only mount). Creates nothing that stays."""
    target = Path(out).expanduser().absolute()
    if target.exists() and not target.is_dir():
        if folder:
            raise UserError(f"{flag} {out!r} is a file; give a new folder")
        try:  # an existing file: it must be replaceable (append mode changes nothing)
            with open(target, "ab"):
                pass
        except OSError as e:
            raise UserError(f"{flag} {out!r}: cannot write it: {e.strerror or e}") from None
        return
    where = target if folder and target.is_dir() else target.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise UserError(f"{flag} {out!r}: {str(where)!r} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ftdiff-probe-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {out!r}: cannot create files in {str(where)!r}: {e.strerror or e}") from None


def shown(ref: Any) -> str:
    """A checkpoint's URL as it may be printed (no credentials)."""
    return redact_url(ref.url)


def check_metadata(ref: Any) -> None:
    """Read and check ``.metadata`` before DCP does: torch folds a failure to read it into an
    AssertionError about metadata being None, and the file and the reason get lost."""
    from service.checkpoint.dcp_io import read_verified_file
    from service.checkpoint.manifest import step_dir
    from service.checkpoint.safe_pickle import load_metadata

    storage, rel = ref.catalog.storage, f"{step_dir(ref.step)}/.metadata"
    load_metadata(read_verified_file(storage, rel, ref.manifest.files), storage.path(rel))


def check_frozen_parts(ref: Any) -> None:
    """Sampling and a diffusers export read the VAE and text encoder from their folders: refuse
    ones whose files changed since the run trained with them (their digests are in its
    fingerprint), instead of drawing or shipping with other weights."""
    from service.models.latent import vae_digest
    from service.models.text import text_encoder_digest

    saved, model = ref.manifest.fingerprint or {}, ref.config.model
    for setting, path, key, digest in (("model.vae", model.vae, "model.vae_weights", vae_digest),
                                       ("model.text_encoder", model.text_encoder, "model.text_encoder_weights",
                                        text_encoder_digest)):
        if path and key in saved and digest(path) != saved[key]:
            raise UserError(f"{setting} = {path!r} holds other files than the run trained with (digest "
                            f"{saved[key]} then, {digest(path)} now); restore them to sample or export this run")


@contextlib.contextmanager
def command_logging(verbose: bool) -> Iterator[None]:
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


_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(count: int) -> str:
    """``512 B``, ``12.3 MiB``: binary units, one decimal (what ``du -h`` users read)."""
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in _UNITS:
        value /= 1024
        # Compare the printed value: 1048575 B is 1023.999 KiB, which would print "1024.0 KiB".
        if round(value, 1) < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


human_time = utc_text  # a Unix time as "2025-05-01 12:00:03 UTC"
