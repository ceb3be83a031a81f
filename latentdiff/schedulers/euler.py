"""Euler sampler (Karras et al. 2022) on the σ-parameterised probability-flow ODE."""

import torch

from . import schedules
from .base import Sampler


class EulerSampler(Sampler):
    """Karras et al. 2022 Alg. 2 without churn: x ← x + (x − x̂_0)/σ · (σ_next − σ), with x = x_0 + σ ε unscaled.

    Follows diffusers' EulerDiscreteScheduler: with the karras, exponential and sgm_uniform schedules the UNet sees
    the unrounded timestep of each σ (float32 timesteps).
    """

    family = "euler"

    def __init__(self, config, scheduler: str = "normal"):
        super().__init__(config, scheduler)
        # Until set_timesteps, σ spans the whole training schedule, so init_noise_sigma is defined (as diffusers).
        table = schedules.sigma_table(self.alphas_cumprod)
        self._prepare(torch.arange(config.num_train_timesteps - 1, -1, -1), torch.cat([table.flip(0), table.new_zeros(1)]))

    def _prepare(self, timesteps: torch.Tensor, sigmas: torch.Tensor):
        self.sigmas = sigmas  # (n + 1,) float32, CPU
        s = sigmas.double()
        self._sigma = s.tolist()
        self._down, self._up = self._split(s[:-1], s[1:])
        # The model sees the VP input x/√(σ² + 1) = α x_0 + σ_vp ε.
        self._alpha = (s**2 + 1).rsqrt().tolist()
        sigma_max = self._sigma[0]
        # x_T ~ N(0, σ_max² + 1) for "leading" (x_T = x_0 + σ ε), σ_max for "trailing" and "linspace" (as diffusers,
        # whatever the noise schedule)
        leading = self.config.timestep_spacing == "leading"
        self.init_noise_sigma = (sigma_max**2 + 1) ** 0.5 if leading else sigma_max

    def _split(self, sigma: torch.Tensor, sigma_next: torch.Tensor):
        """(σ_down, σ_up) per step: the deterministic target level and the fresh noise added there."""
        return sigma_next.tolist(), [0.0] * len(sigma_next)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x = x_0 + σ ε: the σ-space sample this sampler integrates (diffusers' EulerDiscreteScheduler.add_noise),
        σ the schedule's where t is one of its timesteps, else the training σ_t."""
        return x0 + self._sigma_at(t, x0).to(x0.dtype) * noise

    def scale_model_input(self, sample: torch.Tensor, t) -> torch.Tensor:
        return sample * self._alpha[self._index(t)]

    def _step(self, model_output, sample, i, generator):
        alpha, sigma = self._alpha[i], self._sigma[i]
        x0, _ = self._predict(model_output, sample * alpha, alpha, sigma * alpha)
        prev_sample = sample + (sample - x0) / sigma * (self._down[i] - sigma)
        if self._up[i] > 0:
            prev_sample = prev_sample + self._up[i] * self._noise(sample, generator)
        return prev_sample
