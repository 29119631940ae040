"""The report printed when the supervisor gives up: which rank and node failed, and how.

torchelastic's ``@record`` writes each failed worker's traceback to an error file under the
agent's ``--log-dir`` (``<run>/attempt_<n>/<local_rank>/error.json``); the newest one is the
failure that ended the job.
"""

from __future__ import annotations

import json
from pathlib import Path

from service.supervisor.monitor import JobMonitor
from service.supervisor.procs import ending_signal


def newest_error(log_dir: str, node: int | None = None) -> tuple[Path, dict] | None:
    root = Path(log_dir) / f"node{node}" if node is not None else Path(log_dir)
    files = sorted(root.rglob("error.json"), key=lambda p: p.stat().st_mtime)
    if not files and node is not None:
        return newest_error(log_dir, None)
    for path in reversed(files):
        try:
            return path, json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return None


def failure_report(log_dir: str, monitor: JobMonitor, node: int, exit_code: int) -> str:
    lines = [f"ftdiff: job failed — node {node}: torchrun agent exit code {exit_code}"]
    signum = ending_signal(exit_code)
    if signum is not None:
        lines.append(f"node {node} was lost: its torchrun agent was ended by signal {signum}")
    lines.append(f"last committed step: {monitor.last_committed_step}")
    found = newest_error(log_dir, node)
    if found is None:
        lines.append("no worker traceback was recorded (the agent or node itself failed)")
        return "\n".join(lines)
    path, body = found
    local_rank = path.parent.name
    err_node = next((p.name[4:] for p in path.parents if p.name.startswith("node")), str(node))
    rank = next(
        (s.hb.rank for s in monitor.ranks.values() if s.hb.node == err_node and str(s.hb.local_rank) == local_rank),
        None,
    )
    message = body.get("message", {})
    if isinstance(message, dict):
        text = message.get("message", "")
        trace = message.get("extraInfo", {}).get("py_callstack", "")
    else:
        text, trace = str(message), ""
    who = f"rank {rank}" if rank is not None else "rank unknown"
    if err_node != str(node):  # none from the failed node: a peer's error, likely a consequence
        lines.append(f"no worker traceback from node {node}; the newest from another node "
                     "(a peer that saw the failure):")
        lines.append(f"worker: {who}, node {err_node}, local rank {local_rank}")
    else:
        lines.append(f"failing worker: {who}, node {err_node}, local rank {local_rank}")
    lines.append(f"error: {text}")
    if trace:
        lines.append("last traceback:")
        lines += ["  " + line for line in trace.rstrip().splitlines()[-25:]]
    return "\n".join(lines)
