"""Model or EMA weights out of a committed checkpoint, in one process (export, sample, tests).

The UNet is rebuilt from the config recorded in the manifest; every byte goes through the
verifying reader.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.distributed.checkpoint as dcp

from service import state_keys as keys
from service.checkpoint.dcp_io import ByteCounter, VerifyingReader
from service.checkpoint.manifest import step_dir
from service.checkpoint.refs import CheckpointRef
from service.config import Config
from service.models.build import build_model

Weights = Literal["ema", "model"]


def load_weights(ref: CheckpointRef, which: Weights = "ema",
                 counter: ByteCounter | None = None) -> tuple[Config, dict[str, torch.Tensor]]:
    """The denoiser's state dict (EMA or raw weights) of a committed checkpoint, verified (the
    bytes read are counted in ``counter``)."""
    cfg = ref.config
    model = build_model(cfg.model, cfg.run.seed)
    target = {k: torch.empty_like(v) for k, v in model.state_dict().items()}
    if which == "model":
        request = {keys.MODEL: target}
    else:
        names = {n for n, _ in model.named_parameters()}
        request = {keys.EMA: {"shadow": {n: target[n] for n in names}}}
        buffers = {n: t for n, t in target.items() if n not in names}
        if buffers:  # buffers are not averaged: take them from the raw model
            request[keys.MODEL] = buffers
    reader = VerifyingReader.for_folder(ref.catalog.storage, step_dir(ref.step), ref.manifest.files, counter)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(request, storage_reader=reader)
    return cfg, target
