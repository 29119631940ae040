"""Where a run's human-facing files go: the *run directory* is the parent of ``checkpoint.url``
when that is local (``runs/<name>/checkpoints`` -> ``runs/<name>``), else ``runs/<run.name>``
under the working directory (``run.name`` made folder-safe)."""

from __future__ import annotations

from pathlib import Path

from service.config.schema import Config, run_folder


def local_path(url: str) -> str | None:
    """The local path of a path or file:// URL; None for anything remote (s3://, memory://, ...)."""
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if "://" in url else url


def canonical_root(url: str) -> str:
    """One spelling of a checkpoint root: a local one's absolute path (``~`` expanded,
    symlinks resolved), a remote one's URL without secrets or a trailing slash."""
    from service.redact import redact_url

    local = local_path(url)
    return str(Path(local).expanduser().resolve()) if local is not None else redact_url(url).rstrip("/")


def run_dir(cfg: Config) -> Path:
    """Where this run's logs, sample grids and status go (next to its checkpoints when local)."""
    local = local_path(cfg.checkpoint.url)
    if local is not None:
        return Path(local).parent
    return Path("runs") / run_folder(cfg.run.name)
