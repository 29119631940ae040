"""What the denoiser sees of a batch: the frozen VAE's latents of its images (latent
diffusion) or the images themselves, and its condition — class ids, the frozen text encoder's
hidden states of its captions, or nothing."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from service.config import Config
from service.models.latent import encode, load_vae, vae_geometry
from service.models.text import load_text_encoder


class ModelInputs:
    def __init__(self, cfg: Config, device: torch.device):
        self.device = device
        self.vae = load_vae(cfg.model.vae, str(device)) if cfg.model.vae else None
        self.vae_geometry = vae_geometry(cfg.model.vae) if cfg.model.vae else None
        self.text = load_text_encoder(cfg.model.text_encoder, str(device)) if cfg.model.text_encoder else None

    def images(self, batch: dict[str, Any], autocast: contextlib.AbstractContextManager[Any]) -> torch.Tensor:
        """The batch's images, or their latents (encoded under ``autocast``)."""
        images = batch["image"].to(self.device, non_blocking=True)
        if self.vae is None or self.vae_geometry is None:
            return images
        with autocast:
            return encode(self.vae, images, self.vae_geometry)

    def condition(self, batch: dict[str, Any]) -> torch.Tensor | None:
        if "label" in batch:
            return batch["label"].to(self.device, non_blocking=True)
        if "caption" in batch and self.text is not None:
            # fp32, outside autocast: the frozen encoder gives the same states in training and
            # at sampling, whatever the training precision.
            return self.text(list(batch["caption"]))
        return None


def split_batch(batch: dict[str, Any], pieces: int) -> list[dict[str, Any]]:
    """``batch`` in ``pieces`` equal micro-batches (the geometry check makes them equal);
    tensors and lists (captions) alike."""
    if pieces == 1:
        return [batch]
    size = len(batch["position"]) // pieces
    return [{key: value[i * size:(i + 1) * size] for key, value in batch.items()} for i in range(pieces)]
