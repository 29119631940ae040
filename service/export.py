"""Export a checkpoint's weights: a safetensors file, or a diffusers pipeline folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from service.checkpoint.dcp_io import ByteCounter
from service.checkpoint.refs import CheckpointRef
from service.config import redact_config_dict, redact_url
from service.errors import UserError
from service.weights import Weights, load_weights


def export(ref: CheckpointRef, fmt: Literal["safetensors", "diffusers"], out: str, which: Weights = "ema",
           counter: ByteCounter | None = None) -> Path:
    target = Path(out)
    # Usage errors first: reading every byte of a large checkpoint before saying "bad --out"
    # wastes minutes.
    if fmt == "safetensors" and target.is_dir():
        raise UserError(f"--out {out!r} is a directory; give a file name such as unet.safetensors")
    if fmt == "diffusers" and target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"--out {out!r} exists and is not empty; choose a new folder")
    model = ref.config.model
    pipeline_of = {("unet", "none", False): "DDPMPipeline", ("dit", "class", True): "DiTPipeline"}
    if fmt == "diffusers" and (model.family, model.conditioning, bool(model.vae)) not in pipeline_of:
        # DDPMPipeline takes no class labels or VAE, DiTPipeline decodes through a VAE: no
        # diffusers pipeline loads this combination as it was trained.
        space = "latent" if model.vae else "pixel-space"
        raise UserError(f"--format diffusers: no diffusers pipeline loads a {space} {model.conditioning}-"
                        f"conditional {model.family!r} model (DDPMPipeline: unconditional pixel-space unet; "
                        "DiTPipeline: dit with a VAE); use --format safetensors (its weights), or ftdiff "
                        "sample to draw from it")
    cfg, state = load_weights(ref, which, counter)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        target.parent.mkdir(parents=True, exist_ok=True)
        # Redacted on the way out too: a checkpoint written before manifests were redacted
        # may still hold a token or URL credentials, and an exported file travels far.
        meta = {"step": str(ref.step), "weights": which, "source": redact_url(ref.url),
                "config": json.dumps(redact_config_dict(ref.manifest.config), sort_keys=True)}
        save_file({k: v.contiguous() for k, v in state.items()}, str(target), metadata=meta)
        return target
    from diffusers import DDPMPipeline

    from service.models.objective import build_noise_scheduler
    from service.sample import model_from_state

    denoiser, scheduler = model_from_state(cfg, state), build_noise_scheduler(cfg.model)
    if cfg.model.family == "dit":
        from diffusers import DiTPipeline

        from service.models.latent import load_vae

        DiTPipeline(transformer=denoiser, vae=load_vae(cfg.model.vae), scheduler=scheduler).save_pretrained(str(target))
    else:
        DDPMPipeline(unet=denoiser, scheduler=scheduler).save_pretrained(str(target))
    return target
