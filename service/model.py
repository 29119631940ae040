"""The diffusion model: diffusers' UNet2DModel + DDPMScheduler, sized by preset, and its EMA."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

from service.config import ModelConfig, TrainConfig

IMAGE_CHANNELS = 3


@dataclass(frozen=True)
class UNetPreset:
    sample_size: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: int
    norm_num_groups: int


PRESETS: dict[str, UNetPreset] = {
    # A fraction of a second per step on two CPU ranks: the preset every test uses.
    "tiny": UNetPreset(
        sample_size=16,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    ),
    "small": UNetPreset(
        sample_size=32,
        block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        norm_num_groups=32,
    ),
    # The DDPM-style 64x64 model for GPU nodes.
    "base": UNetPreset(
        sample_size=64,
        block_out_channels=(128, 256, 256, 512),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        norm_num_groups=32,
    ),
}


def sample_size(cfg: ModelConfig) -> int:
    return cfg.sample_size or PRESETS[cfg.preset].sample_size


def unet_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Arguments of UNet2DModel for this config (also stored with exported models)."""
    p = PRESETS[cfg.preset]
    return dict(
        sample_size=sample_size(cfg),
        in_channels=IMAGE_CHANNELS,
        out_channels=IMAGE_CHANNELS,
        block_out_channels=p.block_out_channels,
        down_block_types=p.down_block_types,
        up_block_types=p.up_block_types,
        layers_per_block=p.layers_per_block,
        norm_num_groups=p.norm_num_groups,
    )


def check_geometry(cfg: ModelConfig) -> None:
    """Raise ValueError if the image side does not survive the UNet's downsampling."""
    p = PRESETS[cfg.preset]
    factor = 2 ** (len(p.block_out_channels) - 1)
    size = sample_size(cfg)
    if size % factor:
        raise ValueError(
            f"model.sample_size = {size} must be divisible by {factor} for preset {cfg.preset!r}"
        )


def build_unet(cfg: ModelConfig, seed: int) -> UNet2DModel:
    """A freshly initialised UNet; the init depends only on the seed (same on every rank)."""
    check_geometry(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(**unet_kwargs(cfg))


def build_noise_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps)


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

