"""Render a grid of samples from a denoiser (EMA weights by default) as a PNG: unconditional
through diffusers' DDPMPipeline, class- or text-conditional with classifier-free guidance."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMPipeline

from service.config import Config
from service.errors import UserError
from service.models.build import family_of, forward, input_channels, model_kwargs, null_label, sample_size
from service.models.latent import decode, load_vae, vae_geometry
from service.models.objective import build_noise_scheduler

# Classifier-free guidance of class-conditional samples unless --guidance-scale says otherwise.
DEFAULT_GUIDANCE = 3.0


def generate(model: torch.nn.Module, cfg: Config, n: int, seed: int = 0, steps: int = 50,
             on_step: Callable[[int], None] | None = None, class_label: int | None = None,
             guidance_scale: float | None = None, prompt: str | None = None) -> torch.Tensor:
    """``n`` images in [0, 1], shape (n, 3, H, W), by ``steps`` strided ancestral (DDPM) steps
    instead of 1000 — the training scheduler itself, as in an exported pipeline. Deterministic
    DDIM (eta 0) at the same cost leaves an under-trained model's errors in the image (grainy,
    mis-tinted backgrounds); the fresh noise of each ancestral step washes them out.
    ``on_step(done)`` is called after each denoising step (the CLI's progress bar).

    A class-conditional model draws ``class_label`` (default: the classes in turn), a
    text-conditional one ``prompt`` (default: the empty caption), with classifier-free guidance
    ``guidance_scale`` (default ``DEFAULT_GUIDANCE``; 1: none)."""
    conditioning = cfg.model.conditioning
    check_condition_args(cfg, class_label, guidance_scale, prompt)
    scale = DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale
    if conditioning == "class":
        cond, null = _class_condition(cfg, n, class_label)
        return _generate(model, cfg, n, seed, steps, on_step, cond, null, scale)
    if conditioning == "text":
        from service.models.text import load_text_encoder

        assert cfg.model.text_encoder is not None  # config validation
        encoder = load_text_encoder(cfg.model.text_encoder)
        cond, null = encoder([prompt or ""] * n), encoder([""] * n)
        return _generate(model, cfg, n, seed, steps, on_step, cond, null, scale)
    if cfg.model.vae:
        return _generate(model, cfg, n, seed, steps, on_step, None, None, 1.0)
    pipeline = DDPMPipeline(unet=model.eval(), scheduler=build_noise_scheduler(cfg.model))
    pipeline.set_progress_bar_config(disable=True)
    if on_step is not None:  # the pipeline's own progress hook: it wraps the denoising loop
        pipeline.progress_bar = lambda iterable=None, total=None: _counting(iterable, on_step)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = pipeline(batch_size=n, generator=generator, num_inference_steps=steps, output_type="np")
    return torch.from_numpy(out.images).permute(0, 3, 1, 2)


def check_condition_args(cfg: Config, class_label: int | None, guidance_scale: float | None,
                         prompt: str | None) -> None:
    """Refuse a condition the model does not take (before any weights are read)."""
    conditioning = cfg.model.conditioning
    for flag, value, wanted in (("--class", class_label, "class"), ("--prompt", prompt, "text")):
        if value is not None and conditioning != wanted:
            raise UserError(f"{flag}: this model is not {wanted}-conditional (model.conditioning = {conditioning!r})")
    if guidance_scale is not None and conditioning == "none":
        raise UserError("--guidance-scale: this model is unconditional; guidance needs a class or text condition")
    if guidance_scale is not None and guidance_scale < 1:
        raise UserError(f"--guidance-scale {guidance_scale}: at least 1 (1: no guidance)")
    if class_label is not None and not 0 <= class_label < cfg.model.num_classes:
        raise UserError(f"--class {class_label}: this model has classes 0..{cfg.model.num_classes - 1}")


def _class_condition(cfg: Config, n: int, class_label: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the labels drawn, the "null" labels of guidance's unconditional half)."""
    classes = cfg.model.num_classes
    labels = torch.full((n,), class_label) if class_label is not None else torch.arange(n) % classes
    return labels, torch.full((n,), null_label(cfg.model))


def _generate(model: torch.nn.Module, cfg: Config, n: int, seed: int, steps: int,
              on_step: Callable[[int], None] | None, cond: torch.Tensor | None, null: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """DDPMPipeline's loop, with a condition (class labels or text states) and classifier-free
    guidance (the prediction is uncond + scale * (cond - uncond), the unconditional half with
    ``null``: the "null" class or the empty caption), and in a VAE's latent space (decoded at
    the end)."""
    scheduler = build_noise_scheduler(cfg.model)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    side = sample_size(cfg.model)
    x = torch.randn((n, input_channels(cfg.model), side, side), generator=generator)
    model.eval()
    with torch.no_grad():
        for done, t in enumerate(scheduler.timesteps, start=1):
            timesteps = torch.full((n,), int(t))
            if cond is not None and null is not None and scale > 1:
                both = forward(cfg.model, model, torch.cat([x, x]), torch.cat([timesteps, timesteps]),
                               torch.cat([cond, null]))
                conditional, unconditional = both.chunk(2)
                prediction = unconditional + scale * (conditional - unconditional)
            else:
                prediction = forward(cfg.model, model, x, timesteps, cond)
            x = scheduler.step(prediction, t, x, generator=generator).prev_sample
            if on_step is not None:
                on_step(done)
    if cfg.model.vae:
        x = decode(load_vae(cfg.model.vae), x, vae_geometry(cfg.model.vae))
    return (x / 2 + 0.5).clamp(0, 1)


def _counting(steps: Iterable[Any], on_step: Callable[[int], None]) -> Iterator[Any]:
    for done, step in enumerate(steps, start=1):
        yield step
        on_step(done)  # the loop body of step ``done`` has run


def check_grid_path(path: str | Path) -> None:
    """Refuse an output path that cannot be the PNG before any sampling time is spent."""
    if Path(path).is_dir():
        raise UserError(f"--out {str(path)!r} is a directory; give a file name such as grid.png")
    if Path(path).suffix.lower() != ".png":
        raise UserError(f"--out {str(path)!r}: the grid is written as a PNG; give a name ending in .png")


def save_grid(images: torch.Tensor, path: str | Path, scale: int = 4) -> Path:
    """Tile images (n, 3, H, W) in [0, 1] into a square-ish grid PNG, upscaled for viewing."""
    from PIL import Image

    check_grid_path(path)

    n, _, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.ones(3, rows * (h + 1) + 1, cols * (w + 1) + 1)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = images[i]
    arr = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr).resize((grid.shape[2] * scale, grid.shape[1] * scale), Image.NEAREST)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out


def model_from_state(cfg: Config, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = family_of(cfg.model).build(model_kwargs(cfg.model))
    model.load_state_dict(state)
    return model.eval()
