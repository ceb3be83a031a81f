"""DDPM ancestral sampling (Ho et al. 2020), strided over the inference timesteps."""

import torch

from .base import Sampler


class DDPMSampler(Sampler):
    """Ancestral sampling from the posterior q(x_{t'} | x_t, x̂_0), Ho et al. 2020 eqs. 6–7, "fixed_small" variance."""

    def _prepare(self, timesteps: torch.Tensor, sigmas: torch.Tensor):
        # With a stride, t' is the next inference timestep and β_t becomes 1 − ᾱ_t/ᾱ_{t'} (as diffusers).
        a_t = self.alphas_cumprod[timesteps].double()
        a_prev = torch.cat([a_t[1:], a_t.new_ones(1)])  # ᾱ = 1 after the last step: x_0 itself
        beta = 1 - a_t / a_prev
        # posterior mean μ = c_0 x̂_0 + c_t x_t, variance σ² = β_t (1 − ᾱ_{t'})/(1 − ᾱ_t)
        self._c0 = (a_prev.sqrt() * beta / (1 - a_t)).tolist()
        self._ct = ((1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)).tolist()
        self._std = (beta * (1 - a_prev) / (1 - a_t)).sqrt().tolist()
        self._alpha, self._sigma = a_t.sqrt().tolist(), (1 - a_t).sqrt().tolist()

    def _step(self, model_output, sample, i, generator):
        x0, _ = self._predict(model_output, sample, self._alpha[i], self._sigma[i])
        prev_sample = self._c0[i] * x0 + self._ct[i] * sample
        if self._std[i] > 0:  # the last step (t' = 0 or ᾱ_{t'} = 1) is deterministic
            prev_sample = prev_sample + self._std[i] * self._noise(sample, generator)
        return prev_sample
