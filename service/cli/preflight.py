"""``ftdiff train --dry-run``: every check ``ftdiff train`` and its workers make before the
first step, without starting a process or writing a checkpoint.

One line per check on stdout; the first failing check ends the command with its usual error
line and exit code (2 config, geometry or data; 3 storage unreachable or access denied). The
storage check writes and deletes one probe object (it is the only way to know that the
credentials may write), and removes again a local root folder it had to create.
"""

from __future__ import annotations

import socket
from typing import Any

from service.checkpoint.start_plan import plan_start
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
    _say("resume", plan_start(cfg, storage, length, identity))
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
    from service.checkpoint.storage_check import check_reachable, missing_folders, remove_folders

    ck = cfg.checkpoint
    storage = open_storage(ck.url, ck.endpoint_url, ck.region)
    created = missing_folders(storage)
    try:
        check_reachable(storage, write=True, single_writer=ck.single_writer)
    finally:
        remove_folders(created)
    return storage


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
