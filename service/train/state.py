"""Everything a resumed run needs, as Stateful objects under constant keys.

torch.distributed.checkpoint calls ``state_dict()`` on save and ``load_state_dict()`` on load
for every value of the registry, so each component owns the translation of its state.
Tensors replicated across DDP ranks are written once; per-rank state (RNG) lives under
rank-specific keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from service.data.skips import Skips
from service.state_keys import (  # noqa: F401 (the registry's keys, re-exported for the loop)
    DATA,
    EMA,
    GRAD_SCALER,
    LR_SCHEDULER,
    MODEL,
    OPTIMIZER,
    PER_RANK_KEYS,
    RNG,
    TRAIN_STATE,
)


def _int(value: int) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64)


class ModelState(Stateful):
    """The (unwrapped) model weights; works for plain and DDP-wrapped modules."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict)


class OptimizerState(Stateful):
    """AdamW moments keyed by parameter name (not position), so they survive resharding."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


class LRSchedulerState(Stateful):
    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler):
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": _int(self.scheduler.last_epoch)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The schedule is a closed-form function of the step: restore the step, re-derive lrs.
        step = int(state_dict["last_epoch"])
        sched = self.scheduler
        sched.last_epoch = step
        lambdas = getattr(sched, "lr_lambdas", None)
        if lambdas is None:
            raise TypeError(f"{type(sched).__name__} is not a LambdaLR schedule")
        for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, lambdas):
            group["lr"] = base * fn(step)
        sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]


class GradScalerState(Stateful):
    """The fp16 loss scale; empty when the scaler is disabled (fp32 and bf16)."""

    def __init__(self, scaler: torch.amp.GradScaler):
        self.scaler = scaler

    def state_dict(self) -> dict[str, Any]:
        if not self.scaler.is_enabled():
            return {}
        state = self.scaler.state_dict()
        return {k: torch.tensor(float(v)) for k, v in state.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.scaler.is_enabled() and state_dict:
            self.scaler.load_state_dict({k: v.item() for k, v in state_dict.items()})


@dataclass
class TrainState(Stateful):
    """The loop's counters: optimizer steps taken, samples seen, current epoch, and rollbacks
    so far (the run's budget counts them across rollbacks and restarts)."""

    step: int = 0
    samples_seen: int = 0
    epoch: int = 0
    rollbacks: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": _int(self.step), "samples_seen": _int(self.samples_seen), "epoch": _int(self.epoch),
                "rollbacks": _int(self.rollbacks)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.samples_seen = int(state_dict["samples_seen"])
        self.epoch = int(state_dict["epoch"])
        self.rollbacks = int(state_dict.get("rollbacks", 0))  # none in checkpoints of earlier releases


@dataclass
class DataState(Stateful):
    """Position in the global sample stream (see service.data.stream), and the windows of it
    that are skipped (service.data.skips)."""

    position: int = 0
    skips: Skips = field(default_factory=Skips)

    def state_dict(self) -> dict[str, Any]:
        return {"position": _int(self.position), "skips": self.skips.to_tensor()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.position = int(state_dict["position"])
        if "skips" in state_dict:  # none in checkpoints of earlier releases
            self.skips = Skips.from_tensor(state_dict["skips"])


class RNGState(Stateful):
    """This rank's torch RNG streams (CPU and, on GPU nodes, this rank's CUDA device).

    Keyed by rank, because each rank's state differs and DCP would otherwise keep only one
    copy. Restored only when the world size is unchanged; the math itself does not depend on
    it (noise and timesteps come from per-sample seeds).
    """

    def __init__(self, rank: int, device: torch.device):
        self.rank, self.device = rank, device

    def state_dict(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return {f"rank_{self.rank}": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        mine = state_dict[f"rank_{self.rank}"]
        torch.set_rng_state(mine["cpu"])
        if "cuda" in mine and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], self.device)


def build_registry(**components: Stateful) -> dict[str, Stateful]:
    """Check that only the known keys are used, so checkpoints stay readable across versions."""
    known = {MODEL, EMA, OPTIMIZER, LR_SCHEDULER, GRAD_SCALER, TRAIN_STATE, DATA, RNG}
    unknown = set(components) - known
    if unknown:
        raise KeyError(f"unknown state keys {sorted(unknown)}; known: {sorted(known)}")
    return dict(components)


def warmup_cosine(warmup_steps: int, max_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine decay to ``min_ratio`` at ``max_steps``."""
    import math

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
