"""What every model family shares: building the denoiser the config names (through the family
registry), its input size and geometry check, and calling it."""

from __future__ import annotations

import re
from types import ModuleType
from typing import Any

import torch

from service.config import ModelConfig
from service.models.latent import vae_geometry
from service.models.registry import FAMILIES

# Channels of the images the data sources yield (RGB); pixel-space families denoise them.
IMAGE_CHANNELS = 3


def family_of(cfg: ModelConfig) -> ModuleType:
    return FAMILIES[cfg.family].implementation()


def sample_size(cfg: ModelConfig) -> int:
    """The denoiser's input side: ``model.sample_size``, else the preset's (``model.arch``
    may set it too). The latent side when ``model.vae`` is set."""
    return int(family_of(cfg).model_kwargs(cfg)["sample_size"])


def image_size(cfg: ModelConfig) -> int:
    """The side of the images the data yields: the input side, times the VAE's downsampling."""
    return sample_size(cfg) * (vae_geometry(cfg.vae).factor if cfg.vae else 1)


def input_channels(cfg: ModelConfig) -> int:
    """The denoiser's channels: RGB, or the VAE's latent channels."""
    return vae_geometry(cfg.vae).latent_channels if cfg.vae else IMAGE_CHANNELS


def io_kwargs(cfg: ModelConfig, preset_side: int) -> dict[str, Any]:
    """The constructor arguments every family shares: its input side and channels in and out."""
    channels = input_channels(cfg)
    return {"sample_size": cfg.sample_size or preset_side, "in_channels": channels, "out_channels": channels}


def model_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The diffusers constructor's arguments for this config (also stored with exports)."""
    return family_of(cfg).model_kwargs(cfg)


def null_label(cfg: ModelConfig) -> int:
    """The class id of "no class" (classifier-free guidance) for a class-conditional model."""
    return int(family_of(cfg).null_label(cfg))


def check_geometry(cfg: ModelConfig) -> None:
    """Raise ValueError naming what does not fit (e.g. a side the model cannot downsample), or
    a ``model.arch`` keyword the family's class does not take (built on the meta device: no
    memory, no time)."""
    family = family_of(cfg)
    family.check_geometry(cfg)
    with torch.device("meta"):
        _construct(cfg, family)


def build_model(cfg: ModelConfig, seed: int) -> torch.nn.Module:
    """A freshly initialised denoiser; the init depends only on the seed (same on every rank)."""
    family = family_of(cfg)
    family.check_geometry(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _construct(cfg, family)


def forward(cfg: ModelConfig, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
            cond: torch.Tensor | None = None) -> torch.Tensor:
    """The model's prediction for ``noisy`` at ``timesteps`` given ``cond``: class ids, the
    captions' hidden states (text), or None (unconditional)."""
    return family_of(cfg).forward(model, noisy, timesteps, cond)


def _construct(cfg: ModelConfig, family: ModuleType) -> torch.nn.Module:
    try:
        return family.build(family.model_kwargs(cfg))
    except TypeError as e:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if unknown is None:
            raise ValueError(f"model.arch does not fit family {cfg.family!r}: {e}") from None
        raise ValueError(f"model.arch.{unknown.group(1)} is not an argument of the {cfg.family!r} family's "
                         "diffusers model; see that class for the keywords it takes") from None
    except (ValueError, AssertionError, RuntimeError) as e:  # diffusers' own checks of arguments
        raise ValueError(f"model.arch does not fit family {cfg.family!r}: {e}") from None
