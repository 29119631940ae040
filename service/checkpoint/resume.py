"""Resume: find the newest committed checkpoint, load it verified, fall back if it is unusable.

Rank 0 chooses the candidate and broadcasts it; every rank loads through a verifying reader.
A corrupt checkpoint fails the load on all ranks together, is reported, and the next older
committed one is tried. If checkpoints exist and none loads, the job fails with a message
naming each step and reason — never a silent fresh start.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from service.checkpoint.catalog import Catalog, split_checkpoint_url
from service.checkpoint.collectives import (
    CHECKPOINT_ERRORS,
    describe_error,
)
from service.checkpoint.context import CheckpointContext
from service.checkpoint.dcp_io import VerifyingReader, verify_local_file
from service.checkpoint.direct_read import DirectFileReader
from service.checkpoint.errors import CorruptCheckpointError, ManifestError
from service.checkpoint.identity import differences, fingerprint_of_config
from service.checkpoint.load_planner import GrowingFormatLoadPlanner
from service.checkpoint.manifest import Manifest, step_dir
from service.checkpoint.ownership import Ownership
from service.checkpoint.storage import Storage, open_storage
from service.config import Config
from service.config.paths import canonical_root
from service.data.skips import Skips
from service.errors import UserError
from service.models.pretrained import source_lineage
from service.state_keys import DATA

log = logging.getLogger(__name__)
# Fingerprint keys of the model's shape: a fork cannot change them (the weights would not fit).
ARCHITECTURE_KEYS = ("model.architecture.", "model.family", "model.preset", "model.sample_size", "model.conditioning",
                     "model.num_classes", "model.vae", "model.text_encoder")


def check_fork(where: str, changed: list[str], step: int, max_steps: int) -> None:
    """A start from another run's checkpoint ``where`` (its step ``step``) with the math-defining
    settings ``changed``: UserError where the workers must refuse it (the worker's resume and the
    dry run both ask here)."""
    architecture = [line for line in changed if line.startswith(ARCHITECTURE_KEYS)]
    if architecture:
        raise UserError(  # one line: the dry run prints it as its answer too
            f"starting from {where} with another architecture ({'; '.join(architecture)}): its weights do "
            "not fit the model configured now; keep the parent's model settings (a fork may change "
            "anything else: learning rate, data, batch, schedule)")
    if step >= max_steps:
        raise UserError(f"the fork of {where} would train nothing: its step {step} is at or past "
                        f"train.max_steps = {max_steps}; raise train.max_steps")


def changed_math(where: str, hard: list[str]) -> UserError:
    """The refusal of a resume of ``where`` with other math-defining settings (``hard``): the
    worker's, the launcher's and the dry run's, word for word."""
    return UserError(  # one line: what changed, and both ways on
        f"{where} was trained with other settings that define the run's math ({'; '.join(hard)}); "
        "resuming would silently change the run: restore these settings to continue it, or fork it "
        "into a new run that keeps its state and records where it came from: ftdiff train --from "
        f"{where} --set run.name=NEW_NAME, with this start's --config and --set"
    )


def is_fork_of(lineage: dict[str, Any] | None, configured: str, cfg: Config) -> bool:
    """Whether a run whose newest commit records ``lineage`` is a fork of the checkpoint the
    ``checkpoint.resume`` value ``configured`` names (the same root, however it is spelled)."""
    if not lineage:
        return False
    root, pinned = split_checkpoint_url(configured)
    ck = cfg.checkpoint
    parent = open_storage(str(lineage.get("parent_root") or ""), ck.endpoint_url, ck.region)
    return open_storage(root, ck.endpoint_url, ck.region).same_root(parent) and pinned in (None, lineage.get("step"))


class Resumer:
    def __init__(self, ctx: CheckpointContext):
        self.ctx = ctx
        self.cfg, self.info, self.state, self.per_rank_keys = ctx.cfg, ctx.info, ctx.state, ctx.per_rank_keys
        self.catalog, self.group, self.telemetry = ctx.catalog, ctx.group, ctx.telemetry
        self.fingerprint = ctx.fingerprint

    def resume(self, restart: bool) -> int | None:
        """Load the checkpoint the config asks for into the state; the loaded step or None.

        ``checkpoint.resume = "never"`` or a pinned URL decide the *first* start of a run
        only; every restart of the same run (``restart``) resumes from its newest commit.
        """
        configured = self.cfg.checkpoint.resume
        # A restart resumes the run's newest commit; one that crashed before its first commit
        # starts the way its first start did (pinned source again, or fresh). So does a fork
        # started again with the same --from once it has commits of its own.
        continuing = restart and self.group.from_main(lambda: self.catalog.latest() is not None)
        if not continuing and configured not in ("auto", "never") and self.ctx.lineage is not None:
            continuing = self.group.from_main(lambda: self._forked_from(configured))
        mode = "auto" if continuing else configured
        if continuing and configured != "auto":
            log.info("a restart of this run: resuming from its newest commit (checkpoint.resume = %r "
                     "applied at its first start)", configured)
        if mode == "never":
            self.group.from_main(lambda: self._check_fresh_root(restart))
            log.info("checkpoint.resume = never: starting fresh")
            return self._fresh()
        if mode == "auto":
            step = self._load_newest(self.catalog, None)
            return self._fresh() if step is None else step
        root, pinned = split_checkpoint_url(mode)
        ck = self.cfg.checkpoint
        source = Catalog(open_storage(root, ck.endpoint_url, ck.region))
        if source.storage.same_root(self.catalog.storage):
            source = self.catalog  # pinned inside the own root: the own history, checked as such
        self.group.from_main(lambda: self._check_pinned_root(source, pinned))
        return self._load_newest(source, pinned)

    def _fresh(self) -> None:
        """A fresh start: a run started from another run's weights (--weights-only) records them."""
        if self.ctx.lineage is None:
            self.ctx.lineage = source_lineage(self.cfg.model.init_from)
        return None

    def own_lineage(self) -> dict[str, Any] | None:
        """Rank 0: the lineage the run's newest commit records (a fork's parent), or None."""
        found = self.catalog.latest()
        return found[1].lineage if found is not None else None

    def _forked_from(self, configured: str) -> bool:
        """Rank 0: whether this run is a fork of the checkpoint ``configured`` names."""
        return is_fork_of(self.ctx.lineage, configured, self.cfg)

    # -- a root belongs to one run (rank 0; errors reach every rank through from_main) --------
    def _check_fresh_root(self, restart: bool) -> None:
        found = self.catalog.latest()
        others = sorted({r.run_id or "unknown" for r in Ownership(self.catalog.storage).records()
                         if not restart or r.run_id != self.info.run_id})
        if found is None and others:
            raise UserError(
                f"checkpoint.resume = \"never\" but {self.catalog.storage.display_url} was already "
                f"claimed by another run ({', '.join(others)}), which may still be starting; a fresh "
                "run never shares a root. Point checkpoint.url at a new location."
            )
        if found is not None:
            raise UserError(
                f"checkpoint.resume = \"never\" but {self.catalog.storage.display_url} already holds "
                f"committed checkpoints of another run (newest: {step_dir(found[0])}, run "
                f"{found[1].run_id or 'unknown'}); a fresh run never mixes with them.\n"
                "Point checkpoint.url at a new location, or set checkpoint.resume = \"auto\" to "
                "continue that run."
            )

    def _check_pinned_root(self, source: Catalog, pinned: int | None) -> None:
        """A pinned start writes into checkpoint.url: that root must not hold a newer history
        (resuming into the source's own root is allowed only from its newest commit)."""
        own = self.catalog.latest()
        if own is None:
            return
        same_root = source is self.catalog
        if same_root and (pinned is None or pinned == own[0]):
            return
        raise UserError(
            f"checkpoint.resume = {self.cfg.checkpoint.resume!r}, but checkpoint.url "
            f"({self.catalog.storage.display_url}) already holds committed checkpoints up to "
            f"{step_dir(own[0])}; going back or mixing two histories in one root is refused.\n"
            "Point checkpoint.url at a new location to start a new run from the pinned checkpoint."
        )

    def _check_same_math(self, catalog: Catalog, step: int, manifest: Manifest, pinned: bool) -> None:
        saved = manifest.fingerprint or fingerprint_of_config(manifest.config)
        if not saved:
            raise UserError(
                f"{catalog.storage.url_of(step_dir(step))} records neither a fingerprint nor a readable "
                "config, so a change of the settings that define the run cannot be ruled out; resume it "
                "explicitly into a new root (checkpoint.url elsewhere, checkpoint.resume = its URL)."
            )
        hard, soft = differences(saved, self.fingerprint)
        for line in soft:
            why = " (the LR schedule now ends there)" if line.startswith("train.max_steps:") else ""
            log.warning("changed since %s: %s%s", step_dir(step), line, why)
        where = catalog.storage.url_of(step_dir(step))
        if pinned:
            check_fork(where, hard, step, self.cfg.train.max_steps)
        if not hard:
            return
        if pinned:  # an explicit start from another root's checkpoint: allowed, and said
            log.warning("starting from %s with changed settings:\n  %s", where, "\n  ".join(hard))
            return
        raise changed_math(where, hard)

    def _load_newest(self, catalog: Catalog, pinned: int | None) -> int | None:
        tried: list[str] = []
        candidate = self.group.from_main(lambda: self._first_candidate(catalog, pinned))
        if candidate is None and catalog is not self.catalog:  # an explicit source: a typo, a wrong bucket
            raise UserError(
                f"checkpoint.resume = {self.cfg.checkpoint.resume!r}: no committed checkpoint under "
                f"{catalog.storage.display_url}; fix the URL (a silent fresh start would train from "
                "random weights), or set checkpoint.resume = \"never\" to start fresh on purpose."
            )
        if candidate is None:
            log.info("no committed checkpoint under %s: starting fresh", catalog.storage.display_url)
            return None
        while candidate is not None:
            step, manifest = candidate
            t0 = time.monotonic()
            try:
                self.load_step(catalog.storage, step, manifest)
            except CHECKPOINT_ERRORS as e:
                reason = describe_error(e)
                log.error("checkpoint %s is unusable: %s", catalog.storage.url_of(step_dir(step)), reason)
                tried.append(f"{step_dir(step)}: {reason}")
                self.ctx.unloadable_steps.add(step)
                self.telemetry.unloadable()
                if pinned is not None or catalog is not self.catalog:  # a fork never falls back silently
                    break
                below = step
                candidate = self.group.from_main(lambda: self._older_candidate(catalog, below))
                continue
            self.telemetry.loaded(step, manifest.time, t0)
            log.info("resumed from %s (world size %d -> %d)", catalog.storage.url_of(step_dir(step)),
                     manifest.world_size, self.info.world_size)
            if catalog is not self.catalog:  # a fork: its parent, and what changed since
                self._forked(catalog, step, manifest)
            return step
        root, failures = catalog.storage.display_url, "\n  ".join(tried)
        if catalog is not self.catalog:  # another run's: start from another of its checkpoints, knowingly
            raise UserError(f"cannot start from {root}: its checkpoint could not be loaded:\n  {failures}\n"
                            f"Run `ftdiff ckpt verify {root}`; `ftdiff ckpt ls {root}` lists its other "
                            "checkpoints: start from one of those (`ftdiff train --from <its URL>`).")
        raise UserError(f"checkpoints exist under {root} but none could be loaded:\n  {failures}\nRun `ftdiff "
                        f"ckpt verify {root}`; to deliberately start from scratch, point checkpoint.url at a new "
                        "location (a fresh run never shares a root with another).")

    def _forked(self, catalog: Catalog, step: int, manifest: Manifest) -> None:
        """Every rank, after loading another run's checkpoint: record the lineage; a stream of
        other data starts at its beginning (the parent's position means nothing in it)."""
        hard, soft = differences(manifest.fingerprint or fingerprint_of_config(manifest.config), self.fingerprint)
        root = canonical_root(catalog.storage.url)  # a relative local root: absolute, valid from anywhere
        self.ctx.lineage = {"parent": f"{root}/{step_dir(step)}", "parent_root": root,
                            "parent_run": manifest.run_id or "", "step": step, "changed": hard + soft}
        if any(line.startswith("data.") for line in hard):
            self.state[DATA].load_state_dict({"position": torch.zeros((), dtype=torch.int64),
                                              "skips": Skips().to_tensor()})
            log.warning("forked with other data: the sample stream starts at its beginning")
        log.info("a fork of %s (run %s, step %d)", self.ctx.lineage["parent"], manifest.run_id or "unknown", step)

    def _first_candidate(self, catalog: Catalog, pinned: int | None) -> tuple[int, Manifest] | None:
        if pinned is not None:
            try:
                found: tuple[int, Manifest] | None = (pinned, catalog.manifest(pinned))
            except ManifestError as e:
                raise UserError(f"checkpoint {catalog.storage.url_of(step_dir(pinned))}: {e}") from None
        else:
            found = catalog.latest()
        if found is not None:
            # Refused if the math changed, unless this is an explicit start from another root.
            self._check_same_math(catalog, found[0], found[1], pinned=catalog is not self.catalog)
        return found

    def _older_candidate(self, catalog: Catalog, below: int) -> tuple[int, Manifest] | None:
        for step in reversed(catalog.committed_steps()):
            if step < below:
                return step, catalog.manifest(step)
        return None

    def load_step(self, storage: Storage, step: int, manifest: Manifest) -> None:
        """Load committed ``step`` into the state (every rank; verified, as on resume)."""
        # Per-rank state (RNG) only means something at the world size it was saved with.
        same_world = manifest.world_size == self.info.world_size
        state = {k: v for k, v in self.state.items() if same_world or k not in self.per_rank_keys}
        folder = storage.path(step_dir(step))
        if storage.backend.on_local_disk:
            self._load_local(state, folder, manifest)
        else:
            reader = VerifyingReader.for_folder(storage, step_dir(step), manifest.files, self.ctx.bytes_moved)
            dcp.load(state, storage_reader=reader, planner=GrowingFormatLoadPlanner(), process_group=self.group.pg)

    def _load_local(self, state: dict[str, Any], folder: str, manifest: Manifest) -> None:
        """Page-cache reads are cheap, so DCP reads its slices as usual while, alongside, each
        rank verifies its share of the files (CRC-32C over mmap, no copy). The ranks then agree
        on the verdict; a bad file fails the load on every rank, which falls back together."""
        names = sorted(manifest.files)[self.info.rank :: self.info.world_size]
        problems: list[str] = []

        def verify() -> None:
            for name in names:
                try:
                    verify_local_file(os.path.join(folder, name), manifest.files, self.ctx.bytes_moved)
                except CorruptCheckpointError as e:
                    problems.append(str(e))

        checker = threading.Thread(target=verify, name="ckpt-verify", daemon=True)
        checker.start()
        load_error: BaseException | None = None
        try:
            reader = DirectFileReader(folder)
            reader.listed_files = set(manifest.files)  # it opens whatever .metadata names
            dcp.load(state, storage_reader=reader, planner=GrowingFormatLoadPlanner(), process_group=self.group.pg)
        except CHECKPOINT_ERRORS as e:  # a corrupt file may also break deserialisation
            load_error = e
        checker.join()
        verdicts = [p for p in self.group.gather_to_all("; ".join(problems) or None) if p]
        if verdicts:
            raise CorruptCheckpointError(folder, "; ".join(verdicts))
        if load_error is not None:
            raise load_error
