"""Pixels ↔ latents through the VAE: the one place that applies its `scaling_factor`.

LDM trains the UNet on z·s with s = 1/std(z) (Rombach et al. 2022, sec. G), so scaled latents have unit variance
and the noise schedule means what it says. The posterior is kept as diffusers' DiagonalGaussianDistribution keeps
it: mean and log-variance stacked on the channel axis, (B, 2C, h, w).
"""
from __future__ import annotations

import logging

import torch

from .errors import ModelError
from .schedulers import randn

logger = logging.getLogger(__name__)


def posterior(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) pixels in [-1, 1] → posterior parameters (B, 2C, h, w), float32, on the VAE's device."""
    return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.parameters.float()


def sample_posterior(params: torch.Tensor, generator=None) -> torch.Tensor:
    """Unscaled z = mean + std·noise; noise is drawn where the generator lives (the CPU for device-independent runs).

    `generator`: one for the batch, or a list with one per image (image i's noise from generator i alone, as
    diffusers' retrieve_latents draws it image by image). The log-variance clamp matches diffusers'
    DiagonalGaussianDistribution.
    """
    mean, logvar = params.chunk(2, dim=-3)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return mean + std * randn(mean.shape, generator, params.device, params.dtype)


def to_latents(vae, params: torch.Tensor, generator=None) -> torch.Tensor:
    """Scaled latents z·s from posterior parameters: what the UNet is trained on and samples."""
    return sample_posterior(params, generator) * vae.config.scaling_factor


def encode(vae, pixels: torch.Tensor, generator=None) -> torch.Tensor:
    """(B, 3, H, W) pixels in [-1, 1] → scaled latents (B, C, h, w), float32."""
    return to_latents(vae, posterior(vae, pixels), generator)


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents → images (B, 3, H, W) in [0, 1], float32; NaN or all-black output is a ModelError.

    An fp16 VAE whose output overflows decodes again in float32 (once, then back to fp16), as diffusers' upcast does.
    """
    image = _decode(vae, latents)
    if not torch.isfinite(image).all() and vae.dtype == torch.float16:
        logger.warning("the fp16 VAE decoder overflowed; decoding again in float32")
        vae.to(torch.float32)
        try:
            image = _decode(vae, latents)
        finally:
            vae.to(torch.float16)
    if not torch.isfinite(image).all():
        raise ModelError("the VAE decoder produced NaN/inf pixels; decode in float32 (--precision fp32)")
    image = (image / 2 + 0.5).clamp(0, 1)
    if (image == 0).all():
        raise ModelError("the VAE decoder produced an all-black image; the model weights are likely broken")
    return image


def _decode(vae, latents: torch.Tensor) -> torch.Tensor:
    return vae.decode((latents / vae.config.scaling_factor).to(vae.device, vae.dtype), return_dict=False)[0].float()
