"""Rolling a running job back in place to an older commit (after a divergence).

Every rank loads the newest commit at or before a step that the caller knows to be good, never
one taken while a spike was being judged (its manifest says ``suspect_since``), verified as on
resume, falling back to older ones if it is unusable. The commits after it hold the diverged
run: they are deleted (rank 0; manifest first, so a half-deleted one never looks committed), so
that neither a later restart nor a later save of the same step number can meet them again.
"""

from __future__ import annotations

import json
import logging

from service.checkpoint.catalog import Catalog
from service.checkpoint.collectives import CHECKPOINT_ERRORS, describe_error
from service.checkpoint.context import CheckpointContext
from service.checkpoint.manifest import Manifest, step_dir
from service.checkpoint.resume import Resumer

log = logging.getLogger(__name__)

# Beside the step folders: the rollbacks so far and every skip window. The commit a rollback goes
# back to was written before its window existed, so until the next commit this is the only
# durable record of it; a resume merges it into whatever state it loads.
RECORD = "rollbacks.json"


def read_record(catalog: Catalog) -> tuple[int, list[list[int]]]:
    """(rollbacks so far, skip windows) recorded in the root; (0, []) if none or unreadable."""
    try:
        body = json.loads(catalog.storage.read_bytes(RECORD))
        windows = [[int(a), int(b)] for a, b in body["skips"]]
        return int(body["rollbacks"]), [w for w in windows if 0 <= w[0] < w[1]]
    except FileNotFoundError:
        return 0, []
    except (ValueError, KeyError, TypeError) as e:
        log.warning("%s in %s is not valid (%s); ignoring it", RECORD, catalog.storage.display_url, e)
        return 0, []


def rollback_target(catalog: Catalog, at_most: int, unloadable: set[int]) -> tuple[int, Manifest] | None:
    """The newest commit at or before ``at_most`` that may be rolled back to."""
    for step in reversed(catalog.committed_steps()):
        if step > at_most or step in unloadable:
            continue
        manifest = catalog.manifest(step)
        if manifest.suspect_since is None:
            return step, manifest
        log.info("rollback: skipping %s, taken while a spike (from step %d) was being judged",
                 step_dir(step), manifest.suspect_since)
    return None


class Rollback:
    def __init__(self, ctx: CheckpointContext, resumer: Resumer, committed_here: set[int]):
        self.ctx, self.resumer, self.committed_here = ctx, resumer, committed_here

    def to_newest_before(self, at_most: int, record: tuple[int, list[list[int]]]) -> int | None:
        """Every rank: load the newest good commit at or before ``at_most`` into the state,
        forget the commits after it and write ``record`` (rollbacks so far, every skip window);
        its step, or None if there is none."""
        catalog, group = self.ctx.catalog, self.ctx.group
        while True:
            found = group.from_main(lambda: rollback_target(catalog, at_most, self.ctx.unloadable_steps))
            if found is None:
                return None
            step, manifest = found
            try:
                self.resumer.load_step(catalog.storage, step, manifest)
            except CHECKPOINT_ERRORS as e:  # fails on every rank together (see Resumer)
                log.error("rollback: %s is unusable: %s", catalog.storage.url_of(step_dir(step)), describe_error(e))
                self.ctx.unloadable_steps.add(step)
                continue
            group.from_main(lambda: self._forget_after(step, record))
            self.committed_here.difference_update({s for s in self.committed_here if s > step})
            return step

    def _forget_after(self, step: int, record: tuple[int, list[list[int]]]) -> None:
        catalog = self.ctx.catalog
        catalog.fence("recording a rollback")
        rollbacks, windows = record
        catalog.storage.write_bytes_atomic(RECORD, json.dumps({"rollbacks": rollbacks, "skips": windows}).encode())
        for newer in [s for s in catalog.step_folders() if s > step]:
            log.warning("rollback: deleting %s: it holds the diverged run", catalog.storage.url_of(step_dir(newer)))
            catalog.delete(newer)
        catalog.write_pointer(step)
