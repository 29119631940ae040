"""``ftdiff train --dry-run``: every check ``ftdiff train`` and its workers make before the
first step, without starting a process or writing a checkpoint.

One line per check on stdout; the first failing check ends the command with its usual error
line and exit code (2 config, geometry or data; 3 storage unreachable or access denied). The
storage check writes and deletes one probe object (it is the only way to know that the
credentials may write), and removes again a local root folder it had to create.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from service.config import Config
from service.config.advice import config_advice
from service.errors import EXIT_OK, UserError


def dry_run(cfg: Config, nnodes: int, nproc_per_node: int) -> int:
    """Check config, geometry, data, storage, ports and what a start would resume; 0 if all pass."""
    world = nnodes * nproc_per_node
    from service.launch_env import LaunchEnv

    LaunchEnv.read().collective_timeout(cfg.train.collective_timeout_s)  # the old variable, if set, must be valid
    _say("config", f"ok: run {cfg.run.name!r}, {cfg.model.family} preset {cfg.model.preset}, "
                   f"{cfg.train.max_steps} steps, checkpoint every {cfg.checkpoint.every_steps}")
    for line in config_advice(cfg):
        _say("config", f"warning: {line}")
    _say("geometry", _check_geometry(cfg, nnodes, nproc_per_node))
    length, identity, data_line = _check_data(cfg)
    _say("data", data_line)
    storage = _check_storage(cfg)
    _say("storage", f"ok: {storage.display_url} is reachable and writable")
    _say("ports", _check_ports(cfg))
    _say("resume", _resume_plan(cfg, storage, length, identity))
    print(f"dry run ok: `ftdiff train` would start {nnodes} torchrun agent(s) x {nproc_per_node} "
          f"worker(s) ({world} ranks); nothing was started or written")
    return EXIT_OK


def _say(check: str, line: str) -> None:
    print(f"{check:<9} {line}", flush=True)


def _check_geometry(cfg: Config, nnodes: int, nproc_per_node: int) -> str:
    from service.data.stream import check_batch_geometry
    from service.models.build import check_geometry, sample_size
    from service.supervisor.torchrun import check_job_geometry

    check_job_geometry(cfg, nnodes, nproc_per_node)  # the launcher's (every node count it may run)
    world = nnodes * nproc_per_node
    check_batch_geometry(cfg.train.global_batch_size, world, cfg.train.grad_accum_steps)  # the worker's own
    try:
        check_geometry(cfg.model)
    except ValueError as e:  # the model's check is shared with export/sample, hence not a UserError
        raise UserError(str(e)) from None
    size = sample_size(cfg.model)
    return (f"ok: {nnodes} node(s) x {nproc_per_node} process(es) = {world} ranks, "
            f"{cfg.train.global_batch_size // world} samples per rank per step, {size}x{size} images")


def _check_data(cfg: Config) -> tuple[int, dict[str, Any], str]:
    """Build the data source as a worker does (a folder is listed and its first image decoded)."""
    from service.data.stream import build_source, data_identity, training_captions, training_labels

    source = build_source(cfg)
    extra = f", {source.num_classes} classes" if training_labels(cfg, source) is not None else ""  # type: ignore[attr-defined]
    if training_captions(cfg, source) is not None:
        from service.models.text import load_text_encoder

        assert cfg.model.text_encoder is not None  # config validation: text needs one
        load_text_encoder(cfg.model.text_encoder)  # loaded and one caption encoded, as a worker does
        if hasattr(source, "num_captioned"):
            extra += f", {source.num_captioned} captioned"
    return len(source), data_identity(source), f"ok: {cfg.data.kind}, {source.describe()}{extra}"


def _check_storage(cfg: Config) -> Any:
    """Reachable and writable (the workers' probe), leaving no folder behind that was not there."""
    from service.checkpoint.storage import open_storage
    from service.checkpoint.storage_check import check_reachable

    ck = cfg.checkpoint
    storage = open_storage(ck.url, ck.endpoint_url, ck.region)
    created = _missing_folders(storage.root) if storage.backend.on_local_disk else []
    try:
        check_reachable(storage, write=True, single_writer=ck.single_writer)
    finally:
        for folder in created:  # deepest first; stops at the first one that is not empty
            try:
                os.rmdir(folder)
            except OSError:
                break
    return storage


def _missing_folders(path: str) -> list[str]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while path and not os.path.lexists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _check_ports(cfg: Config) -> str:
    """The supervisor's listening addresses are free (the launcher would fail on them)."""
    addresses = {(cfg.supervisor.host, cfg.supervisor.port), (cfg.metrics.host, cfg.metrics.port)}
    checked = []
    for host, port in sorted(addresses):
        if port == 0:  # an ephemeral port: always available
            continue
        try:
            socket.create_server((host, port)).close()  # SO_REUSEADDR, as the HTTP server does
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} (supervisor.port/metrics.port): {e}") from None
        checked.append(f"{host}:{port}")
    return f"ok: {', '.join(checked)} free" if checked else "ok: ephemeral ports"


def _resume_plan(cfg: Config, storage: Any, data_length: int, data: dict[str, Any]) -> str:
    """What a first start would do with the root, refusing what the workers would refuse."""
    from service.checkpoint.catalog import Catalog
    from service.checkpoint.manifest import step_dir

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
    from service.cli.common import human_time

    left = cfg.train.max_steps - step
    todo = f"{left} steps to go" if left > 0 else f"already at train.max_steps = {cfg.train.max_steps}"
    return (f"resumes from step {step} (run {manifest.run_id or 'unknown'}, committed "
            f"{human_time(manifest.time)}), {todo}{notes}")


def _math_changes(cfg: Config, catalog: Any, step: int, manifest: Any, data_length: int,
                  data: dict[str, Any]) -> str:
    """Refuse a resume with other math-defining settings, as the workers would."""
    from service.checkpoint.identity import differences, fingerprint, fingerprint_of_config

    saved = manifest.fingerprint or fingerprint_of_config(manifest.config)
    hard, soft = differences(saved, fingerprint(cfg, data_length=data_length, data=data))
    if hard:
        where = catalog.storage.display_url
        raise UserError(
            f"{where} holds a run trained with other settings that define its math: {'; '.join(hard)}; "
            "restore them to continue it, or set checkpoint.url to a new location")
    return f" (changed: {'; '.join(soft)})" if soft else ""


def _pinned_plan(cfg: Config, own: Any, latest: tuple[int, Any] | None, data_length: int,
                 data: dict[str, Any]) -> str:
    """``checkpoint.resume = URL[/step-N]`` (or ``--from``): the source exists; the own root has
    no newer history unless it is this fork's; a fork keeps the architecture and has steps to go."""
    from service.checkpoint.catalog import Catalog, split_checkpoint_url
    from service.checkpoint.errors import ManifestError
    from service.checkpoint.identity import differences, fingerprint, fingerprint_of_config
    from service.checkpoint.manifest import step_dir
    from service.checkpoint.resume import check_fork, is_fork_of
    from service.checkpoint.storage import open_storage

    ck = cfg.checkpoint
    root, pinned = split_checkpoint_url(ck.resume)
    source = Catalog(open_storage(root, ck.endpoint_url, ck.region))
    same = source.storage.same_root(own.storage)
    if latest is not None and is_fork_of(latest[1].lineage, ck.resume, cfg):
        return f"continues this fork of {latest[1].lineage['parent']}: resumes from its step {latest[0]}"
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
    if not same:  # a fork: the worker's rules
        saved = manifest.fingerprint or fingerprint_of_config(manifest.config)
        hard, _ = differences(saved, fingerprint(cfg, data_length=data_length, data=data))
        check_fork(source.storage.url_of(step_dir(pinned)), hard, pinned, cfg.train.max_steps)
    return f"starts from {source.storage.display_url}/{step_dir(pinned)} (pinned by checkpoint.resume)"
