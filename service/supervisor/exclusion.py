"""Which nodes to leave out of the job (supervisor.exclude_diverged_nodes, exclude_slow_after_s).

Pure policy over what the heartbeats say, with an injected clock: a node whose replica the
majority disagreed with (the workers rolled back already; a node that corrupts its copy once
tends to do it again), or whose slowest rank has computed below ``SLOW_SPEED`` of the fastest
rank for ``exclude_slow_after_s``. Whether leaving them out is allowed is the elastic range's
call (``allowed``); carrying it out is the launcher's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from service.config.schema import SupervisorConfig

log = logging.getLogger(__name__)

# The RankSlow alert's threshold (deploy/prometheus/ftdiff.rules.yml): below it a rank holds the
# job back by a third or more.
SLOW_SPEED = 0.7

# Why a node is left out (label ``reason`` of ftdiff_job_node_exclusions_total).
DIVERGED = "diverged_replica"
SLOW = "slow"


class ExclusionPolicy:
    def __init__(self, cfg: SupervisorConfig, clock: Callable[[], float] = time.monotonic):
        self.cfg, self.clock = cfg, clock
        self._slow_since: dict[str, float] = {}
        self._kept: set[str] = set()  # nodes due but kept (min_nodes), said once each

    @property
    def enabled(self) -> bool:
        return self.cfg.exclude_diverged_nodes or self.cfg.exclude_slow_after_s > 0

    def due(self, suspects: set[str], speeds: dict[int, tuple[str, float]]) -> dict[str, str]:
        """node -> why it should be left out now. ``suspects``: nodes named by replica checks;
        ``speeds``: rank -> (node, speed relative to the fastest rank)."""
        due = {node: DIVERGED for node in suspects} if self.cfg.exclude_diverged_nodes else {}
        if self.cfg.exclude_slow_after_s <= 0:
            return due
        now = self.clock()
        slowest: dict[str, float] = {}
        for node, speed in speeds.values():
            slowest[node] = min(speed, slowest.get(node, 1.0))
        for node in list(self._slow_since):
            if slowest.get(node, 1.0) >= SLOW_SPEED:  # caught up, or not measured since a restart
                del self._slow_since[node]
        for node, speed in slowest.items():
            if speed < SLOW_SPEED:
                since = self._slow_since.setdefault(node, now)
                if now - since >= self.cfg.exclude_slow_after_s:
                    due.setdefault(node, SLOW)
        return due

    def report(self, due: dict[str, str]) -> None:
        """Attach mode launches nothing, so it cannot leave a node out: each due node is said
        once, for the operator (or the scheduler) to act on."""
        for node, why in due.items():
            if node not in self._kept:
                self._kept.add(node)
                log.error("node %s: %s: this supervisor launches nothing (attach mode); cordon the node "
                          "and restart the job without it", node, why.replace("_", " "))

    def may_leave(self, active: int, due: dict[str, str], min_nodes: int | None) -> dict[str, str]:
        """Those of the ``due`` nodes that may go, of ``active`` ones: the job keeps at least
        ``min_nodes`` (unset: the job may not shrink at all) and at least one node; diverged
        replicas go first (they corrupt the job, a slow node only holds it back). Each node kept
        although due is reported once (the operator cordons it)."""
        room = 0 if min_nodes is None else max(0, active - max(1, min_nodes))
        order = sorted(due, key=lambda node: (due[node] != DIVERGED, node))
        leaving = {node: due[node] for node in order[:room]}
        for node in order[room:]:
            if node not in self._kept:
                self._kept.add(node)
                log.error("node %s: %s, but leaving it out too would take the job below supervisor.min_nodes "
                          "(%s, of %d nodes): keeping it; cordon the node", node, due[node].replace("_", " "),
                          min_nodes or "unset: no shrinking", active)
        return leaving
