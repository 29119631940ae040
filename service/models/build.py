"""What every model family shares: building the denoiser the config names (through the family
registry), its input size and geometry check, and the noise scheduler."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from diffusers import DDPMScheduler

from service.config import ModelConfig
from service.models.registry import FAMILIES

# Channels of the images the data sources yield (RGB); pixel-space families denoise them.
IMAGE_CHANNELS = 3


def family_of(cfg: ModelConfig) -> ModuleType:
    return FAMILIES[cfg.family].implementation()


def sample_size(cfg: ModelConfig) -> int:
    """The denoiser's input side: ``model.sample_size``, else the preset's."""
    return cfg.sample_size or family_of(cfg).PRESETS[cfg.preset].sample_size


def model_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The diffusers constructor's arguments for this config (also stored with exports)."""
    return family_of(cfg).model_kwargs(cfg)


def check_geometry(cfg: ModelConfig) -> None:
    """Raise ValueError naming what does not fit (e.g. a side the model cannot downsample)."""
    family_of(cfg).check_geometry(cfg)


def build_model(cfg: ModelConfig, seed: int) -> torch.nn.Module:
    """A freshly initialised denoiser; the init depends only on the seed (same on every rank)."""
    family = family_of(cfg)
    family.check_geometry(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return family.build(family.model_kwargs(cfg))


def build_noise_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps)
