"""The model families: one line each. Config validation (``model.family``, ``model.preset``),
the run's identity, the dry run and the builders all read this table, so a new family is its
module plus one line here.

Pure data on purpose (no torch, no config import): ``service.config`` validates against it.
The preset names are repeated here so that validating a config does not import diffusers;
tests/unit/test_model.py checks that they match the family module's ``PRESETS``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class ModelFamily:
    name: str
    """The value of ``model.family``."""
    module: str
    """The module that builds it. It provides ``PRESETS`` (name -> preset with a
    ``sample_size``), ``model_kwargs(cfg) -> dict`` (the diffusers constructor's arguments,
    ``model.arch`` applied; also stored with exports), ``check_geometry(kwargs)`` (ValueError
    naming what does not fit), ``build(kwargs) -> torch.nn.Module`` and ``forward(model,
    noisy, timesteps, cond) -> prediction`` (``cond``: class ids, the captions' hidden states,
    or None)."""
    presets: tuple[str, ...]
    conditionings: tuple[str, ...] = ("none",)
    """The values of ``model.conditioning`` it supports."""

    def implementation(self) -> ModuleType:
        return importlib.import_module(self.module)


FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (
    # diffusers' UNet2DModel, unconditional or class-conditional
    ModelFamily("unet", "service.models.unet", ("tiny", "small", "base"), conditionings=("none", "class")),
    # diffusers' UNet2DConditionModel, text-conditional (cross-attention to model.text_encoder)
    ModelFamily("unet-cond", "service.models.unet_cond", ("tiny", "small"), conditionings=("text",)),
    # diffusers' DiTTransformer2DModel, class-conditional
    ModelFamily("dit", "service.models.dit", ("tiny", "S/2", "B/2"), conditionings=("class",)),
)}
DEFAULT_FAMILY = "unet"
