"""The ``dit`` family: diffusers' DiTTransformer2DModel (Peebles & Xie 2023), class-conditional,
in pixel space (the latent side once a VAE is configured).

Its label table has ``num_embeds_ada_norm`` (1000, ImageNet's classes) entries plus the "null"
class at index 1000, which diffusers' DiTPipeline uses for classifier-free guidance, so
``model.num_classes`` may be anything up to 1000. diffusers drops labels inside the model with
the global RNG while training; ftdiff turns that off and drops them in the data instead, as a
pure function of (seed, epoch, index), so the stream stays the same at every world size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from service.models.build import io_kwargs

if TYPE_CHECKING:
    from service.config import ModelConfig

IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class DiTPreset:
    sample_size: int
    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    patch_size: int


PRESETS: dict[str, DiTPreset] = {
    # A fraction of a second per step on two CPU ranks, like the unet's tiny.
    "tiny": DiTPreset(sample_size=16, num_layers=2, num_attention_heads=2, attention_head_dim=16, patch_size=2),
    # The paper's S/2 and B/2, sized for 32x32 latents (256x256 images through an 8x VAE).
    "S/2": DiTPreset(sample_size=32, num_layers=12, num_attention_heads=6, attention_head_dim=64, patch_size=2),
    "B/2": DiTPreset(sample_size=32, num_layers=12, num_attention_heads=12, attention_head_dim=64, patch_size=2),
}


def model_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Arguments of DiTTransformer2DModel for this config (also stored with exported models)."""
    p = PRESETS[cfg.preset]
    kwargs: dict[str, Any] = dict(
        **io_kwargs(cfg, p.sample_size),
        num_layers=p.num_layers,
        num_attention_heads=p.num_attention_heads,
        attention_head_dim=p.attention_head_dim,
        patch_size=p.patch_size,
        num_embeds_ada_norm=IMAGENET_CLASSES,
        norm_type="ada_norm_zero",
    )
    return {**kwargs, **cfg.arch}


def null_label(cfg: ModelConfig) -> int:
    """The "null" class of guidance: the entry after the last class (DiTPipeline's 1000)."""
    return int(model_kwargs(cfg)["num_embeds_ada_norm"])


def check_geometry(cfg: ModelConfig) -> None:
    kwargs = model_kwargs(cfg)
    size, patch = kwargs["sample_size"], kwargs["patch_size"]
    if size % patch:
        raise ValueError(f"model.sample_size = {size} must be divisible by the patch size {patch}")
    if cfg.num_classes > kwargs["num_embeds_ada_norm"]:
        raise ValueError(f"model.num_classes = {cfg.num_classes} is more than the DiT's label table "
                         f"(model.arch.num_embeds_ada_norm = {kwargs['num_embeds_ada_norm']})")


def build(kwargs: dict[str, Any]) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel
    from diffusers.models.embeddings import LabelEmbedding

    model = DiTTransformer2DModel(**kwargs)
    for module in model.modules():  # labels are dropped in the data, deterministically
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return model


def forward(model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
            labels: torch.Tensor | None) -> torch.Tensor:
    if labels is None:
        raise ValueError("a DiT is class-conditional: it needs class labels")
    return model(noisy, timestep=timesteps, class_labels=labels).sample
