"""The denoiser as the worker trains it: built from the config (or started from
``model.init_from``), made cheaper to run (activation checkpointing, torch.compile, TF32 on
CUDA), wrapped for DDP, and its optimizer (fused AdamW on CUDA)."""

from __future__ import annotations

import logging
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from service.config import Config
from service.dist import DistInfo
from service.errors import UserError
from service.models.build import build_model
from service.models.pretrained import load_init_weights

log = logging.getLogger(__name__)


def build_denoiser(cfg: Config, info: DistInfo) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model, what the loop calls: the model or its DDP wrapper)."""
    try:
        model = build_model(cfg.model, cfg.run.seed)
    except ValueError as e:  # model.arch or the geometry: the config's fault
        raise UserError(str(e)) from None
    if cfg.model.init_from:
        # Replaced by the run's own checkpoint when there is one (Checkpointer.resume).
        load_init_weights(cfg.model.init_from, model)
        log.info("model initialised from %s", cfg.model.init_from)
    model = model.to(info.device)
    if cfg.train.activation_checkpointing:
        model.enable_gradient_checkpointing()  # recompute activations in backward: less memory
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # bf16/TF32 tensor cores; fp32 accumulation
        torch.backends.cudnn.allow_tf32 = True
    if cfg.train.compile:
        # In place (Module.compile): the parameter names, and so the checkpoints, stay the same.
        # The first steps pay the compilation, and so does every restart unless the inductor
        # cache (TORCHINDUCTOR_CACHE_DIR) survives it.
        model.compile()
    net: torch.nn.Module = model
    # One rank has no one to average gradients with: DDP would only copy every gradient into its
    # buckets and back each step (the same values; checkpoints name parameters the same either way).
    if dist.is_initialized() and info.world_size > 1:
        ids = [info.device.index] if info.device.type == "cuda" else None
        # No buffer broadcast before every forward: the families' buffers (a DiT's positional
        # table) are fixed and equal on every rank, and the broadcast would be a collective in
        # the forward pass, where a rank's own compute time is measured (stragglers).
        # torch 2.13 deprecates the flag but advises keeping it until `init_sync_buffers` exists
        # (its replacement still syncs at init): silence that one warning, once per rank.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
            net = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    return model, net


def build_optimizer(cfg: Config, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    # Fused on CUDA (one kernel for every parameter); elsewhere the default implementation,
    # whose results the CPU checkpoints of earlier releases were made with.
    fused = True if device.type == "cuda" else None
    return torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused)


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    choice = cfg.train.precision
    if choice == "auto":
        choice = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]
