"""Euler ancestral sampler (k-diffusion's sample_euler_ancestral, Karras et al. 2022 σ-parameterisation)."""

import torch

from .euler import EulerSampler


class EulerAncestralSampler(EulerSampler):
    """Euler step down to σ_down, then fresh noise of std σ_up, with σ_down² + σ_up² = σ_next² (eta = 1)."""

    def _split(self, sigma: torch.Tensor, sigma_next: torch.Tensor):
        # σ_up = √(σ_next² (σ² − σ_next²)/σ²): the DDPM posterior std in σ-space (k-diffusion get_ancestral_step)
        up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt()
        return (sigma_next**2 - up**2).sqrt().tolist(), up.tolist()
