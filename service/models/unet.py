"""The ``unet`` family: diffusers' UNet2DModel, unconditional, in pixel space, in three sizes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from service.models.build import IMAGE_CHANNELS

if TYPE_CHECKING:
    from service.config import ModelConfig


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


def _side(cfg: ModelConfig) -> int:
    return cfg.sample_size or PRESETS[cfg.preset].sample_size


def model_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Arguments of UNet2DModel for this config (also stored with exported models)."""
    p = PRESETS[cfg.preset]
    return dict(
        sample_size=_side(cfg),
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
    factor = 2 ** (len(PRESETS[cfg.preset].block_out_channels) - 1)
    size = _side(cfg)
    if size % factor:
        raise ValueError(
            f"model.sample_size = {size} must be divisible by {factor} for preset {cfg.preset!r}"
        )


def build(kwargs: dict[str, Any]) -> torch.nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(**kwargs)
