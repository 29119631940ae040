"""``ftdiff ckpt ls|show|verify|prune``: read, check and prune a run's checkpoints."""

from __future__ import annotations

import argparse
import json
import sys

from service.cli.common import human_bytes, human_time, open_catalog, resolve_ref, shown
from service.cli.progress import bars_enabled, byte_progress
from service.config import redact_text
from service.errors import EXIT_FAILURE, EXIT_OK, UserError


def cmd_ckpt_ls(args: argparse.Namespace) -> int:
    infos = open_catalog(args.url, args).describe()
    if args.json:  # a contract (docs/operations.md): keep this shape byte for byte
        print(json.dumps([i.to_json() for i in infos]))
        return EXIT_OK
    if not infos:
        print("(no checkpoints)")
        return EXIT_OK
    rows = [("STEP", "STATE", "SIZE", "TIME", "PATH")]
    rows += [(str(i.step), "committed" if i.committed else "partial", human_bytes(i.bytes),
              human_time(i.time), i.path) for i in infos]
    widths = [max(len(row[c]) for row in rows) for c in range(4)]
    for row in rows:  # numbers right-aligned, words left-aligned
        print(f"{row[0]:>{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  "
              f"{row[3]:<{widths[3]}}  {row[4]}".rstrip())
    committed = [i for i in infos if i.committed]
    newest = f"; newest committed: step {committed[-1].step}" if committed else "; none committed"
    print(f"{len(infos)} checkpoint folder(s), {human_bytes(sum(i.bytes for i in infos))}{newest}")
    return EXIT_OK


def cmd_ckpt_show(args: argparse.Namespace) -> int:
    """The manifest as JSON: what the checkpoint is, the (redacted) config and fingerprint it was
    trained with, the run that wrote it, skip windows and suspicion; times as Unix and UTC."""
    from service.config import redact_config_dict

    ref = resolve_ref(args)
    m = ref.manifest
    print(json.dumps({
        "url": shown(ref), "step": m.step, "world_size": m.world_size, "samples_seen": m.samples_seen,
        "time": m.time, "time_utc": human_time(m.time), "bytes": m.total_bytes,
        "run_id": m.run_id, "incarnation": m.incarnation, "lineage": m.lineage,
        "suspect_since": m.suspect_since, "skips": m.skips,
        "config_hash": m.config_hash, "versions": m.versions, "fingerprint": m.fingerprint,
        "config": redact_config_dict(m.config),
        "files": {k: {"size": v.size, "crc32c": v.crc32c} for k, v in sorted(m.files.items())},
    }, indent=2))
    return EXIT_OK


def cmd_ckpt_verify(args: argparse.Namespace) -> int:
    from service.checkpoint.catalog import split_checkpoint_url
    from service.checkpoint.manifest import step_dir

    root, step = split_checkpoint_url(args.url)
    catalog = open_catalog(root, args)
    problems: list[str] = []
    if step is None:
        # A run's root: its latest committed checkpoint, and the pointer that should name it.
        committed = catalog.committed_steps()  # a full scan: verify reads everything anyway
        if not committed:
            from service.errors import BadCheckpointError

            raise BadCheckpointError(f"no committed checkpoint under {catalog.storage.display_url}")
        step = committed[-1]
        pointer = catalog.pointer_step()
        if pointer != step:
            problems.append(f"latest pointer names {pointer!r}, but the newest committed step is {step}")
    with byte_progress("verify", _total_bytes(catalog, step) if bars_enabled() else 0) as counter:
        problems += catalog.verify(step, counter)
    where = f"{catalog.storage.display_url}/{step_dir(step)}"
    if problems:
        print(f"CORRUPT {where}", file=sys.stderr)
        for p in problems:
            print(f"  {redact_text(p)}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"OK {where}")
    return EXIT_OK


def _total_bytes(catalog: object, step: int) -> int:
    """The bar's total: the manifest's byte count (0, no bar, if it has none to give)."""
    from service.checkpoint.errors import ManifestError

    try:
        return int(catalog.manifest(step).total_bytes)  # type: ignore[attr-defined]
    except ManifestError:
        return 0  # verify itself reports why


def cmd_ckpt_prune(args: argparse.Namespace) -> int:
    from service.checkpoint.retention import apply_retention, retention_plan

    if args.keep_last < 2:  # as checkpoint.keep_last: the newest commit may still be in flight
        raise UserError(f"--keep-last {args.keep_last}: keep at least 2 (as checkpoint.keep_last: a save of the "
                        "running job may be in flight, and the one before it is the fallback)")
    if args.keep_every < 0:
        raise UserError(f"--keep-every {args.keep_every}: must be 0 (none) or a positive step interval")
    catalog = open_catalog(args.url, args)
    if args.dry_run:  # the very selection apply_retention deletes, without deleting it
        doomed = retention_plan(catalog, args.keep_last, args.keep_every)
        kept = [s for s in catalog.step_folders() if s not in set(doomed)]
        if args.json:
            print(json.dumps({"dry_run": True, "would_delete": doomed, "kept": kept}))
        else:
            _print_steps("would delete", doomed, catalog)
            _print_steps("would keep", kept, catalog)
        return EXIT_OK
    deleted, failed = apply_retention(catalog, args.keep_last, args.keep_every)
    if args.json:
        print(json.dumps({"deleted": deleted, "failed": failed}))
    else:
        _print_steps("deleted", deleted, catalog)
        if failed:
            _print_steps("failed to delete (retried by the next prune)", failed, catalog)
    return EXIT_FAILURE if failed else EXIT_OK


def _print_steps(what: str, steps: list[int], catalog: object) -> None:
    from service.checkpoint.manifest import step_dir

    url = catalog.storage.display_url  # type: ignore[attr-defined]
    print(f"{what}: {len(steps)} checkpoint folder(s)" + (":" if steps else ""))
    for step in steps:
        print(f"  {step:>10}  {url}/{step_dir(step)}")
