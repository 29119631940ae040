"""``ftdiff runs ls``: the runs under a parent folder (``runs/`` by default), with their state,
newest committed step and where their checkpoints are."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from service.cli.common import human_time
from service.errors import EXIT_OK, UserError
from service.redact import redact_url


def cmd_runs_ls(args: argparse.Namespace) -> int:
    parent = Path(args.parent)
    if not parent.is_dir():
        raise UserError(f"{parent} is not a folder of runs (`ftdiff train` puts runs under runs/<run.name>/)")
    found = (_describe(folder, args.endpoint_url, args.region) for folder in sorted(parent.iterdir()) if folder.is_dir())
    runs = [r for r in found if r]
    if args.json:
        print(json.dumps(runs))
        return EXIT_OK
    if not runs:
        print(f"(no runs under {parent})")
        return EXIT_OK
    rows = [("NAME", "STATE", "STEP", "UPDATED", "FORKED FROM", "CHECKPOINTS")]
    rows += [(r["name"], r["state"], f"{r['step'] if r['step'] is not None else '-'}/{r['max_steps'] or '?'}",
              human_time(r["updated"]), _parent(r["lineage"]), r["checkpoint_url"]) for r in runs]
    widths = [max(len(row[c]) for row in rows) for c in range(5)]
    for row in rows:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]:<{widths[3]}}  "
              f"{row[4]:<{widths[4]}}  {row[5]}".rstrip())
    return EXIT_OK


def _describe(folder: Path, endpoint_url: str | None = None, region: str | None = None) -> dict[str, Any] | None:
    """One run: its status (``ftdiff train`` writes one) and its newest commit; None for a
    folder that is no run."""
    from service.supervisor.run_status import read_status

    status = read_status(folder) or {}
    url = status.get("checkpoint_url") if isinstance(status.get("checkpoint_url"), str) else None
    if url is None and (folder / "checkpoints").is_dir():
        url = str(folder / "checkpoints")
    if url is None:
        return None
    step, updated, max_steps, lineage = _newest(url, endpoint_url, region)
    if not status and step is None and not any((folder / "checkpoints").glob("step-*")):
        return None  # a start refused before its first commit left an empty root: no run
    recorded = status.get("max_steps")
    max_steps = recorded if isinstance(recorded, int) else max_steps
    state = status.get("state") if isinstance(status.get("state"), str) else None
    if state is None:  # no status (a job started another way): judged from its commits
        state = "finished" if step is not None and max_steps and step >= max_steps else "stopped"
    times = [t for t in (updated, status.get("ended"), status.get("started")) if isinstance(t, (int, float))]
    return {"name": str(status.get("name") or folder.name), "folder": str(folder), "state": state, "step": step,
            "max_steps": max_steps, "updated": max(times) if times else None, "exit_code": status.get("exit_code"),
            "checkpoint_url": redact_url(url), "lineage": lineage}


def _parent(lineage: dict[str, Any] | None) -> str:
    return f"{lineage['parent_root']} @ {lineage['step']}" if lineage else "-"


def _newest(url: str, endpoint_url: str | None = None,
            region: str | None = None) -> tuple[int | None, float | None, int | None, dict[str, Any] | None]:
    """(newest committed step, its time, the max_steps it was trained towards, its lineage);
    Nones if the root cannot be read (a remote store out of reach: the row still shows)."""
    from service.checkpoint.catalog import Catalog
    from service.checkpoint.storage import open_storage

    try:
        found = Catalog(open_storage(url, endpoint_url, region)).latest()
    except Exception:  # noqa: BLE001 — a listing of many runs must not fail on one
        return None, None, None, None
    if found is None:
        return None, None, None, None
    step, manifest = found
    train = manifest.config.get("train", {}) if isinstance(manifest.config, dict) else {}
    return step, manifest.time, train.get("max_steps") if isinstance(train, dict) else None, manifest.lineage
