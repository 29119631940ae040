"""The ``unet`` family: diffusers' UNet2DModel in pixel space, in three sizes; unconditional, or
class-conditional through its class embedding (``num_class_embeds``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from service.models.build import io_kwargs

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


def preset_kwargs(cfg: ModelConfig, p: UNetPreset) -> dict[str, Any]:
    """The constructor arguments a UNet preset sets (UNet2DModel's and UNet2DConditionModel's)."""
    return dict(
        **io_kwargs(cfg, p.sample_size),
        block_out_channels=p.block_out_channels,
        down_block_types=p.down_block_types,
        up_block_types=p.up_block_types,
        layers_per_block=p.layers_per_block,
        norm_num_groups=p.norm_num_groups,
    )


def model_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Arguments of UNet2DModel for this config (also stored with exported models)."""
    kwargs = preset_kwargs(cfg, PRESETS[cfg.preset])
    if cfg.conditioning == "class":  # one more embedding: the "null" class of guidance
        kwargs["num_class_embeds"] = cfg.num_classes + 1
    return {**kwargs, **cfg.arch}


def null_label(cfg: ModelConfig) -> int:
    """The class id trained (and sampled) as "no class": the last embedding."""
    return cfg.num_classes


def check_geometry(cfg: ModelConfig) -> None:
    """Raise ValueError if the image side does not survive the UNet's downsampling."""
    check_downsampling(cfg, model_kwargs(cfg))


def check_downsampling(cfg: ModelConfig, kwargs: dict[str, Any]) -> None:
    """Raise ValueError if ``kwargs``' input side does not survive a UNet's downsampling
    (one halving per block after the first)."""
    factor = 2 ** (len(kwargs["block_out_channels"]) - 1)
    size = kwargs["sample_size"]
    if size % factor:
        raise ValueError(
            f"model.sample_size = {size} must be divisible by {factor} for preset {cfg.preset!r}"
        )


def build(kwargs: dict[str, Any]) -> torch.nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(**kwargs)


def forward(model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
            labels: torch.Tensor | None) -> torch.Tensor:
    return model(noisy, timesteps, class_labels=labels).sample
