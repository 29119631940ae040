"""Export a checkpoint's weights: a safetensors file, or a diffusers pipeline folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch

from service.checkpoint.dcp_io import ByteCounter
from service.checkpoint.refs import CheckpointRef
from service.config import Config, redact_config_dict, redact_url
from service.errors import UserError
from service.weights import Weights, load_weights

# (family, conditioning, with a VAE) -> the diffusers pipeline that samples it as trained.
PIPELINES = {("unet", "none", False): "DDPMPipeline", ("dit", "class", True): "DiTPipeline",
             ("unet-cond", "text", True): "StableDiffusionPipeline"}


def check_pipeline(ref: CheckpointRef) -> None:
    """Refuse what no diffusers pipeline loads as it was trained: DDPMPipeline takes no class
    labels or VAE, DiTPipeline and StableDiffusionPipeline decode through a VAE (and the latter
    knows no shift factor)."""
    model = ref.config.model
    if (model.family, model.conditioning, bool(model.vae)) not in PIPELINES:
        space = "latent" if model.vae else "pixel-space"
        raise UserError(f"--format diffusers: no diffusers pipeline loads a {space} {model.conditioning}-"
                        f"conditional {model.family!r} model (DDPMPipeline: unconditional pixel-space unet; "
                        "DiTPipeline: dit with a VAE; StableDiffusionPipeline: unet-cond with a VAE); use "
                        "--format safetensors (its weights), or ftdiff sample to draw from it")
    if model.family == "unet-cond" and model.vae:
        from service.models.latent import vae_geometry

        if vae_geometry(model.vae).shift_factor:
            raise UserError("--format diffusers: StableDiffusionPipeline decodes without the VAE's shift_factor "
                            f"({vae_geometry(model.vae).shift_factor}); use --format safetensors")


def _text_to_image_pipeline(cfg: Config, unet: torch.nn.Module, scheduler: Any) -> Any:
    """Stable Diffusion's pipeline around the trained UNet, with the run's frozen VAE, text
    encoder and tokenizer (no safety checker: nothing to download)."""
    from diffusers import StableDiffusionPipeline

    from service.models.latent import load_vae
    from service.models.text import load_text_encoder

    assert cfg.model.vae is not None and cfg.model.text_encoder is not None  # check_pipeline
    text = load_text_encoder(cfg.model.text_encoder)
    text.tokenizer.model_max_length = text.max_length  # the pipeline pads prompts to it, as training did
    return StableDiffusionPipeline(vae=load_vae(cfg.model.vae), text_encoder=text.model, tokenizer=text.tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def export(ref: CheckpointRef, fmt: Literal["safetensors", "diffusers"], out: str, which: Weights = "ema",
           counter: ByteCounter | None = None) -> Path:
    target = Path(out)
    # Usage errors first: reading every byte of a large checkpoint before saying "bad --out"
    # wastes minutes.
    if fmt == "safetensors" and target.is_dir():
        raise UserError(f"--out {out!r} is a directory; give a file name such as unet.safetensors")
    if fmt == "diffusers" and target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"--out {out!r} exists and is not empty; choose a new folder")
    if fmt == "diffusers":
        check_pipeline(ref)
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
    if cfg.model.family == "unet-cond":
        _text_to_image_pipeline(cfg, denoiser, scheduler).save_pretrained(str(target))
    elif cfg.model.family == "dit":
        from diffusers import DiTPipeline

        from service.models.latent import load_vae

        DiTPipeline(transformer=denoiser, vae=load_vae(cfg.model.vae), scheduler=scheduler).save_pretrained(str(target))
    else:
        DDPMPipeline(unet=denoiser, scheduler=scheduler).save_pretrained(str(target))
    return target


def export_init_weights(ref: CheckpointRef, parent_folder: Path) -> Path:
    """The EMA weights of ``ref`` as a diffusers model folder under ``parent_folder`` (one per
    checkpoint: ``<digest of its URL>-step-N``), with ``SOURCE_FILE`` naming where they came
    from (the new run's lineage). An existing complete folder is reused."""
    import hashlib

    from service.checkpoint.manifest import step_dir
    from service.config.paths import canonical_root
    from service.models.pretrained import SOURCE_FILE
    from service.sample import model_from_state

    root = canonical_root(ref.catalog.storage.display_url)
    target = parent_folder / f"{hashlib.sha256(root.encode()).hexdigest()[:12]}-step-{ref.step}"
    if (target / SOURCE_FILE).is_file():  # written last: the folder is complete
        return target.resolve()
    cfg, state = load_weights(ref, "ema")
    partial = target.with_name(target.name + ".partial")
    if partial.exists():
        import shutil

        shutil.rmtree(partial)
    model_from_state(cfg, state).save_pretrained(str(partial))
    lineage = {"parent": f"{root}/{step_dir(ref.step)}", "parent_root": root,  # valid from any folder
               "parent_run": ref.manifest.run_id or "", "step": ref.step, "weights": "ema"}
    (partial / SOURCE_FILE).write_text(json.dumps(lineage, indent=1) + "\n")
    partial.rename(target)
    return target.resolve()


def check_init_fit(ref: CheckpointRef, cfg: Config) -> None:
    """Whether the weights of ``ref`` fit the model ``cfg`` configures (both built on the meta
    device: nothing read but the manifest); UserError naming the tensors if not."""
    from service.models.build import build_model
    from service.models.pretrained import misfit

    with torch.device("meta"):
        theirs, ours = build_model(ref.config.model, 0), build_model(cfg.model, 0)
    if type(theirs) is not type(ours):
        raise UserError(f"--weights-only: {shown_ref(ref)} holds a {type(theirs).__name__}, but this run's "
                        f"model.family builds a {type(ours).__name__}")
    detail = misfit({k: v.shape for k, v in ours.state_dict().items()},
                    {k: v.shape for k, v in theirs.state_dict().items()})
    if detail:
        raise UserError(f"--weights-only: the weights of {shown_ref(ref)} do not fit this run's architecture "
                        f"({detail}); keep the model settings that change these tensors")


def shown_ref(ref: CheckpointRef) -> str:
    return redact_url(ref.url)
