"""What the checkpointer's parts share, built once: the job, the state, the store and its
views, the checkpoint group, the telemetry and the staging buffers."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from torch.distributed.checkpoint.stateful import Stateful

from service.checkpoint import identity
from service.checkpoint.catalog import Catalog
from service.checkpoint.collectives import CheckpointGroup
from service.checkpoint.dcp_io import ByteCounter
from service.checkpoint.ownership import Ownership
from service.checkpoint.snapshot import Staging
from service.checkpoint.storage import Storage, open_storage
from service.checkpoint.telemetry import CheckpointTelemetry
from service.config import Config
from service.dist import DistInfo
from service.metrics import CheckpointMetrics


@dataclass
class CheckpointContext:
    cfg: Config
    info: DistInfo
    state: dict[str, Stateful]
    """The state registry: every entry is saved and restored."""
    per_rank_keys: frozenset[str]
    """Entries that differ per rank (restored only at the same world size)."""
    fingerprint: dict[str, Any]
    """The settings that define the run's math (``identity.fingerprint``)."""
    storage: Storage
    ownership: Ownership
    catalog: Catalog
    group: CheckpointGroup
    telemetry: CheckpointTelemetry
    staging: Staging
    bytes_moved: ByteCounter = field(default_factory=ByteCounter)
    """Checkpoint bytes this process's saves and loads moved (heartbeats carry it)."""
    unloadable_steps: set[int] = field(default_factory=set)
    """Committed steps this run failed to load (the resume fell back past them): when training
    reaches one again, its save replaces the unusable folder instead of taking "already
    committed" for an answer. Written by the resume, read by the commit protocol."""
    lineage: dict[str, Any] | None = None
    """Where this run was forked from (parent checkpoint, its run, the settings changed), set
    by the resume and recorded in every manifest the run commits; None for a run of its own."""

    @property
    def run_id(self) -> str | None:
        return self.info.run_id

    @classmethod
    def open(cls, cfg: Config, info: DistInfo, state: dict[str, Stateful], metrics: CheckpointMetrics | None,
             per_rank_keys: Collection[str], fingerprint: dict[str, Any] | None = None) -> "CheckpointContext":
        ck = cfg.checkpoint
        storage = open_storage(ck.url, ck.endpoint_url, ck.region)
        ownership = Ownership(storage)
        return cls(
            cfg, info, state, frozenset(per_rank_keys),
            fingerprint if fingerprint is not None else identity.fingerprint(cfg),
            storage, ownership, Catalog(storage, fence=ownership.check_current), CheckpointGroup(info),
            CheckpointTelemetry(metrics), Staging(pin_memory=info.device.type == "cuda"),
        )
