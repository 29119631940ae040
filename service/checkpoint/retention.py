"""Which checkpoint folders may be deleted after a new commit.

Only ever called after a commit succeeded, with the list of committed steps read back from
storage, so the newest committed checkpoint is by construction never a candidate.
"""

from __future__ import annotations

import logging

from service.checkpoint.catalog import Catalog
from service.checkpoint.manifest import step_dir

log = logging.getLogger(__name__)


def plan_deletions(
    committed: list[int], uncommitted: list[int], keep_last: int, keep_every: int, also_keep: int | None = None
) -> list[int]:
    """Steps to delete: committed ones outside the keep set, and abandoned partial folders.

    keep set = the newest ``keep_last`` committed + every committed multiple of ``keep_every``
    + ``also_keep`` (the newest commit a rollback may go back to).
    A partial folder older than the newest commit is debris of a failed save; newer partial
    folders may be a save in flight and are left alone.
    """
    if not committed:
        return []
    committed = sorted(committed)
    keep = set(committed[-max(1, keep_last):])
    if keep_every:
        keep |= {s for s in committed if s % keep_every == 0}
    if also_keep is not None:
        keep.add(also_keep)
    newest = committed[-1]
    doomed = [s for s in committed if s not in keep]
    doomed += [s for s in uncommitted if s < newest]
    return sorted(doomed)


def retention_plan(catalog: Catalog, keep_last: int, keep_every: int) -> list[int]:
    """The steps ``apply_retention`` would delete now, read from storage (``ckpt prune --dry-run``
    shows exactly this list)."""
    folders = catalog.step_folders()
    committed = catalog.committed_steps()
    uncommitted = [s for s in folders if s not in set(committed)]
    return plan_deletions(committed, uncommitted, keep_last, keep_every, newest_unsuspect(catalog, committed))


def newest_unsuspect(catalog: Catalog, committed: list[int]) -> int | None:
    """The newest commit not taken while a spike was being judged: while one is judged (or if
    the run ended then), the commits after the spike began must not push out the one a
    rollback would go back to. One manifest read in the usual case."""
    for step in reversed(committed):
        if catalog.manifest(step).suspect_since is None:
            return step
    return None


def apply_retention(catalog: Catalog, keep_last: int, keep_every: int) -> tuple[list[int], list[int]]:
    """Delete what the policy allows; returns (deleted, failed). A failure is retried next time."""
    deleted, failed = [], []
    for step in retention_plan(catalog, keep_last, keep_every):
        try:
            catalog.delete(step)
            deleted.append(step)
        except Exception as e:  # never fatal: the folder is retried after the next commit
            log.warning("retention: could not delete %s (%s); will retry", step_dir(step), e)
            failed.append(step)
    if deleted:
        log.info("retention: deleted %s", ", ".join(step_dir(s) for s in deleted))
    return deleted, failed
