"""Latent diffusion: ``model.vae`` names a diffusers AutoencoderKL (a local folder, a pipeline
folder with a ``vae/`` in it, or a hub id already in the local cache). It is frozen and in eval
mode; images are encoded on the fly under ``no_grad`` (bf16 autocast on CUDA) and the denoiser
works on ``(latent - shift_factor) * scaling_factor``, as diffusers' pipelines decode it.

The latent is the mode of the encoder's distribution, not a draw from it: a pure function of
the image, so the sample stream stays deterministic at every world size and restart.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service.errors import UserError


@dataclass(frozen=True)
class VaeGeometry:
    factor: int
    """Image side / latent side."""
    latent_channels: int
    scaling_factor: float
    shift_factor: float


def _where(path: str) -> dict[str, Any]:
    """``from_pretrained``'s arguments for the autoencoder under ``path`` (a hub id: its
    snapshot in the local cache)."""
    from service.models.digest import local_folder

    folder = local_folder(path, f"model.vae = {path!r}")
    if (folder / "vae" / "config.json").is_file():
        return {"pretrained_model_name_or_path": str(folder), "subfolder": "vae"}
    return {"pretrained_model_name_or_path": str(folder)}


@functools.lru_cache(maxsize=8)
def vae_geometry(path: str) -> VaeGeometry:
    """Read from the autoencoder's config alone (no weights)."""
    from diffusers import AutoencoderKL

    try:
        config = AutoencoderKL.load_config(**_where(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"model.vae = {path!r}: no AutoencoderKL config there ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); give a local folder (or a pipeline folder with vae/)") from None
    if config.get("_class_name") != "AutoencoderKL":
        raise UserError(f"model.vae = {path!r} holds a {config.get('_class_name')!r}, not an AutoencoderKL")
    return VaeGeometry(factor=2 ** (len(config["block_out_channels"]) - 1),
                       latent_channels=int(config["latent_channels"]),
                       scaling_factor=float(config.get("scaling_factor") or 1.0),
                       shift_factor=float(config.get("shift_factor") or 0.0))


@functools.lru_cache(maxsize=8)
def vae_digest(path: str) -> str:
    """A digest of the autoencoder's config and weights (sha256, 16 hex digits): part of the
    run's identity, so a resume with another VAE under the same path is refused."""
    from service.models.digest import files_digest

    where = _where(path)
    return files_digest([Path(where["pretrained_model_name_or_path"]) / where.get("subfolder", "")],
                        f"model.vae = {path!r}")


@functools.lru_cache(maxsize=2)
def load_vae(path: str, device: str = "cpu") -> torch.nn.Module:
    """The frozen autoencoder (safetensors only: a pickled checkpoint could run code on load)."""
    from diffusers import AutoencoderKL

    try:
        # low_cpu_mem_usage=False: the plain load, without a warning that accelerate is missing.
        vae = AutoencoderKL.from_pretrained(**_where(path), use_safetensors=True, local_files_only=True,
                                            low_cpu_mem_usage=False)
    except (OSError, ValueError, EnvironmentError) as e:
        raise UserError(f"model.vae = {path!r} cannot be loaded ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); it needs a config.json and safetensors weights") from None
    return vae.to(device).eval().requires_grad_(False)


def encode(vae: torch.nn.Module, images: torch.Tensor, geometry: VaeGeometry) -> torch.Tensor:
    """Images in [-1, 1] -> the denoiser's latents."""
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mode()
    return (latents.float() - geometry.shift_factor) * geometry.scaling_factor


def decode(vae: torch.nn.Module, latents: torch.Tensor, geometry: VaeGeometry) -> torch.Tensor:
    """The denoiser's latents -> images in [-1, 1]."""
    with torch.no_grad():
        return vae.decode(latents / geometry.scaling_factor + geometry.shift_factor).sample.float()
