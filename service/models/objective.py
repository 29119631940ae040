"""The training objective: the noise schedule, what the model predicts, and the loss.

``model.beta_schedule`` and ``model.prediction_type`` configure diffusers' DDPMScheduler, which
is also what exports record and samplers use. With ``train.snr_gamma`` the per-sample MSE is
weighted by min(SNR, gamma) / SNR for epsilon prediction (min(SNR, gamma) / (SNR + 1) for v,
min(SNR, gamma) for the sample): Min-SNR weighting (Hang et al. 2023).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from service.config import ModelConfig


def build_noise_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    # Sampling clips the predicted clean image to [-1, 1]: right for pixels, wrong for a VAE's
    # latents, which are not bounded (Stable Diffusion's schedulers do not clip). Training
    # (add_noise, get_velocity) does not read it.
    # Stable Diffusion's pipeline (the unet-cond family's export) samples at timesteps shifted
    # by one (steps_offset = 1) and rewrites any other value when it loads: ftdiff samples so too.
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, clip_sample=not cfg.vae,
                         steps_offset=1 if cfg.family == "unet-cond" else 0)


def target(scheduler: DDPMScheduler, images: torch.Tensor, noise: torch.Tensor,
           timesteps: torch.Tensor) -> torch.Tensor:
    """What the model is trained to predict."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(images, noise, timesteps)
    return images


def loss(scheduler: DDPMScheduler, prediction: torch.Tensor, wanted: torch.Tensor, timesteps: torch.Tensor,
         snr_gamma: float | None) -> torch.Tensor:
    """The batch's mean loss (plain MSE without ``snr_gamma``)."""
    if snr_gamma is None:
        return F.mse_loss(prediction, wanted)
    per_sample = F.mse_loss(prediction, wanted, reduction="none").mean(dim=tuple(range(1, prediction.ndim)))
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=snr_gamma)
    kind = scheduler.config.prediction_type
    weight = clipped / snr if kind == "epsilon" else clipped / (snr + 1) if kind == "v_prediction" else clipped
    return (per_sample * weight).mean()
