"""What a start would do with its checkpoint root — resume which step, start fresh, fork — and
what it must refuse, as the workers' resume would (service.checkpoint.resume's rules): the dry
run asks here with the data's identity, and ``ftdiff train`` before it starts any process, so a
changed architecture or other math is refused once, in one line, with nothing written."""

from __future__ import annotations

from typing import Any

from service.checkpoint.catalog import Catalog, split_checkpoint_url
from service.checkpoint.errors import ManifestError
from service.checkpoint.identity import differences, fingerprint, fingerprint_of_config
from service.checkpoint.manifest import step_dir
from service.checkpoint.resume import changed_math, check_fork, is_fork_of
from service.checkpoint.storage import open_storage
from service.config import Config
from service.errors import UserError
from service.logs import utc_text


def plan_start(cfg: Config, storage: Any, data_length: int | None = None, data: dict[str, Any] | None = None) -> str:
    """What a first start would do with the root, refusing (UserError) what the workers would
    refuse. Without ``data_length`` and ``data`` (the launcher, which does not read the data)
    everything but the data's identity is checked; the workers check that too."""
    catalog = Catalog(storage)
    latest = catalog.latest()
    mode = cfg.checkpoint.resume
    if mode == "never":
        if latest is not None:
            raise UserError(
                f"checkpoint.resume = \"never\" but {storage.display_url} already holds committed "
                f"checkpoints (newest: {step_dir(latest[0])}); point checkpoint.url at a new location, "
                "or set checkpoint.resume = \"auto\" to continue that run")
        return "fresh start (checkpoint.resume = \"never\")"
    if mode != "auto":
        return _pinned_plan(cfg, catalog, latest, data_length, data)
    if latest is None:
        return f"fresh start: no committed checkpoint under {storage.display_url}"
    step, manifest = latest
    notes = _math_changes(cfg, catalog, step, manifest, data_length, data)
    left = cfg.train.max_steps - step
    todo = f"{left} steps to go" if left > 0 else f"already at train.max_steps = {cfg.train.max_steps}"
    return (f"resumes from step {step} (run {manifest.run_id or 'unknown'}, committed "
            f"{utc_text(manifest.time)}), {todo}{notes}")


def _math_changes(cfg: Config, catalog: Any, step: int, manifest: Any, data_length: int | None,
                  data: dict[str, Any] | None) -> str:
    """Refuse a resume with other math-defining settings, as the workers would."""
    saved = manifest.fingerprint or fingerprint_of_config(manifest.config)
    hard, soft = differences(saved, fingerprint(cfg, data_length=data_length, data=data))
    if hard:
        raise changed_math(catalog.storage.url_of(step_dir(step)), hard)
    return f" (changed: {'; '.join(soft)})" if soft else ""


def _pinned_plan(cfg: Config, own: Any, latest: tuple[int, Any] | None, data_length: int | None,
                 data: dict[str, Any] | None) -> str:
    """``checkpoint.resume = URL[/step-N]`` (or ``--from``): the source exists; the own root has
    no newer history unless it is this fork's; a fork keeps the architecture and has steps to go."""
    ck = cfg.checkpoint
    root, pinned = split_checkpoint_url(ck.resume)
    source = Catalog(open_storage(root, ck.endpoint_url, ck.region))
    same = source.storage.same_root(own.storage)
    if latest is not None and is_fork_of(latest[1].lineage, ck.resume, cfg):  # the workers resume it as "auto"
        notes = _math_changes(cfg, own, latest[0], latest[1], data_length, data)
        return f"continues this fork of {latest[1].lineage['parent']}: resumes from its step {latest[0]}{notes}"
    if latest is not None and not (same and pinned in (None, latest[0])):
        raise UserError(
            f"checkpoint.resume = {source.storage.display_url!r}, but checkpoint.url ({own.storage.display_url}) "
            f"already holds committed checkpoints up to {step_dir(latest[0])}; point checkpoint.url "
            "at a new location to start a new run from the pinned checkpoint")
    if pinned is None:
        found = source.latest()
        if found is None:
            raise UserError(f"checkpoint.resume: no committed checkpoint under {source.storage.display_url}")
        pinned = found[0]
    try:
        manifest = source.manifest(pinned)
    except ManifestError as e:
        raise UserError(f"checkpoint.resume: {source.storage.display_url}/{step_dir(pinned)}: {e}") from None
    notes = ""
    if same:  # pinned inside the own root: the own history, checked as the workers check it
        notes = _math_changes(cfg, own, pinned, manifest, data_length, data)
    else:  # a fork: the worker's rules
        saved = manifest.fingerprint or fingerprint_of_config(manifest.config)
        hard, _ = differences(saved, fingerprint(cfg, data_length=data_length, data=data))
        check_fork(source.storage.url_of(step_dir(pinned)), hard, pinned, cfg.train.max_steps)
    return f"starts from {source.storage.display_url}/{step_dir(pinned)} (pinned by checkpoint.resume){notes}"
