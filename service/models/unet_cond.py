"""The ``unet-cond`` family: diffusers' UNet2DConditionModel (Stable Diffusion's denoiser),
conditioned on captions through cross-attention to a frozen text encoder's hidden states
(``model.text_encoder``); in pixel space, or on a VAE's latents as Stable Diffusion is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from service.models.text import text_geometry
from service.models.unet import UNetPreset, check_downsampling, preset_kwargs

if TYPE_CHECKING:
    from service.config import ModelConfig


@dataclass(frozen=True)
class UNetCondPreset(UNetPreset):
    attention_head_dim: int


PRESETS: dict[str, UNetCondPreset] = {
    # CPU tests: cross-attention at the full resolution only.
    "tiny": UNetCondPreset(
        sample_size=16,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
    ),
    # Stable Diffusion's layout at a third of its width, for 32x32 latents (256x256 images
    # through an 8x VAE).
    "small": UNetCondPreset(
        sample_size=32,
        block_out_channels=(128, 256, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        norm_num_groups=32,
        attention_head_dim=8,
    ),
}


def model_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Arguments of UNet2DConditionModel for this config: the cross-attention width is the
    text encoder's."""
    p = PRESETS[cfg.preset]
    assert cfg.text_encoder is not None  # config validation: the family is text-conditional
    kwargs = preset_kwargs(cfg, p)
    kwargs.update(attention_head_dim=p.attention_head_dim,
                  cross_attention_dim=text_geometry(cfg.text_encoder).hidden_size)
    return {**kwargs, **cfg.arch}


def check_geometry(cfg: ModelConfig) -> None:
    """Raise ValueError if the input side does not survive the UNet's downsampling."""
    check_downsampling(cfg, model_kwargs(cfg))


def build(kwargs: dict[str, Any]) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**kwargs)


def forward(model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
            cond: torch.Tensor | None) -> torch.Tensor:
    if cond is None:
        raise ValueError("a unet-cond model is text-conditional: it needs the captions' hidden states")
    return model(noisy, timesteps, encoder_hidden_states=cond).sample
