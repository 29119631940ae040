"""How a local job's end is judged and cleaned up: whether a preemption's emergency checkpoint
is in storage, and the run's memory-tier files, which nobody can use once its workers are gone."""

from __future__ import annotations

import logging

from service.checkpoint.catalog import Catalog
from service.checkpoint.memory_tier import MemoryTier
from service.checkpoint.storage import open_storage
from service.config import Config

log = logging.getLogger(__name__)


def emergency_commit_problem(cfg: Config, run_id: str, asked_at: float) -> str | None:
    """None if this run committed a checkpoint after ``asked_at`` (the stop signal), else what
    was found instead."""
    ck = cfg.checkpoint
    try:
        found = Catalog(open_storage(ck.url, ck.endpoint_url, ck.region)).latest()
    except Exception as e:  # storage down: the commit cannot be confirmed
        return f"the emergency checkpoint could not be confirmed ({type(e).__name__}: {e})"
    if found is None:
        return "no checkpoint is committed at all"
    step, manifest = found
    if manifest.run_id != run_id:
        return (f"the newest commit (step {step}) belongs to another run ({manifest.run_id or 'unknown'}): "
                "this job was superseded and its emergency checkpoint is not in storage")
    if manifest.time < asked_at:
        return (f"no emergency checkpoint was committed after the stop signal (newest: step {step}, "
                f"{asked_at - manifest.time:.0f}s before it); up to checkpoint.every_steps steps are lost")
    return None


def remove_run_files(cfg: Config, run_id: str) -> None:
    """Remove the run's memory-tier files (snapshots and progress records). Only once every
    worker of the run is gone: the run id is the supervisor's own, so no later start can take
    them, and they would hold shared memory until the one-day sweep."""
    try:
        removed = MemoryTier(run_id, cfg.checkpoint.memory_tier_dir).remove_run()
    except OSError as e:
        log.warning("memory tier: could not remove this run's snapshots: %s", e)
        return
    if removed:
        log.info("memory tier: removed %d file(s) of this run", removed)
