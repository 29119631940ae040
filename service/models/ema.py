"""The exponential moving average of the weights (diffusers' EMAModel) and its checkpointable view."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.training_utils import EMAModel

from service.config import TrainConfig


def build_ema(model: torch.nn.Module, cfg: TrainConfig) -> EMAModel:
    # EMA warm-up lets short runs show their progress in EMA samples too.
    return EMAModel(model.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, foreach=True)


class EMAState:
    """Stateful view of the EMA: shadow weights by parameter name, plus its step counter."""

    def __init__(self, ema: EMAModel, model: torch.nn.Module):
        self.ema = ema
        self.names = [n for n, _ in model.named_parameters()]

    def state_dict(self) -> dict[str, Any]:
        return {
            "shadow": dict(zip(self.names, self.ema.shadow_params)),
            "step": torch.tensor(self.ema.optimization_step, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow = state["shadow"]
        with torch.no_grad():
            for name, param in zip(self.names, self.ema.shadow_params):
                param.copy_(shadow[name])
        self.ema.optimization_step = int(state["step"])

