"""Reading model or EMA weights out of a committed checkpoint, in one process.

Used by ``ftdiff export`` / ``ftdiff sample`` and by tests that compare runs. The model is
rebuilt from the config stored in the manifest; the bytes go through the verifying reader.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed.checkpoint as dcp

from service.checkpoint.catalog import Catalog, split_checkpoint_url
from service.checkpoint.dcp_io import VerifyingReader
from service.checkpoint.manifest import Manifest, ManifestError, step_dir
from service.checkpoint.storage import open_storage
from service.config import Config, config_from_dict
from service.errors import UserError
from service.train import state as keys

Weights = Literal["ema", "model"]


@dataclass
class CheckpointRef:
    catalog: Catalog
    step: int
    manifest: Manifest

    @property
    def url(self) -> str:
        return self.catalog.storage.url_of(step_dir(self.step))

    @property
    def config(self) -> Config:
        return config_from_dict(self.manifest.config, source=f"{self.url}/manifest.json")


def resolve(url: str, endpoint_url: str | None = None, region: str | None = None) -> CheckpointRef:
    """``URL`` (a run's root: its latest committed checkpoint) or ``URL/step-N``."""
    root, step = split_checkpoint_url(url)
    catalog = Catalog(open_storage(root, endpoint_url, region))
    if step is not None:
        try:
            return CheckpointRef(catalog, step, catalog.manifest(step))
        except ManifestError as e:
            raise UserError(f"{url}: {e}") from None
    found = catalog.latest()
    if found is None:
        raise UserError(f"no committed checkpoint under {catalog.storage.display_url}")
    return CheckpointRef(catalog, found[0], found[1])


def load_weights(ref: CheckpointRef, which: Weights = "ema") -> tuple[Config, dict[str, torch.Tensor]]:
    """The UNet state dict (EMA or raw weights) of a committed checkpoint, verified."""
    from service.train.model import build_unet

    cfg = ref.config
    model = build_unet(cfg.model, cfg.run.seed)
    target = {k: torch.empty_like(v) for k, v in model.state_dict().items()}
    if which == "model":
        request = {keys.MODEL: target}
    else:
        names = {n for n, _ in model.named_parameters()}
        request = {keys.EMA: {"shadow": {n: target[n] for n in names}}}
        buffers = {n: t for n, t in target.items() if n not in names}
        if buffers:  # buffers are not averaged: take them from the raw model
            request[keys.MODEL] = buffers
    storage = ref.catalog.storage
    reader = VerifyingReader(storage.fs, storage.path(step_dir(ref.step)), ref.manifest.files)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(request, storage_reader=reader)
    return cfg, target
