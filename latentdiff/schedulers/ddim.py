"""DDIM (Song et al. 2021), deterministic for eta = 0."""

import torch

from .base import Sampler


class DDIMSampler(Sampler):
    """Song et al. 2021 eq. 12: x_{t'} = √ᾱ_{t'} x̂_0 + √(1 − ᾱ_{t'} − σ_t²) ε̂ + σ_t z, σ_t scaled by eta (eq. 16)."""

    def __init__(self, config, eta: float = 0.0, scheduler: str = "normal"):
        super().__init__(config, scheduler)
        if not 0 <= eta <= 1:  # above 1, 1 − ᾱ_{t'} − σ_t² turns negative and the update is NaN
            raise ValueError(f"eta must be between 0 (deterministic) and 1 (DDPM-like), got {eta}.")
        self.eta = eta

    def _prepare(self, timesteps: torch.Tensor, sigmas: torch.Tensor):
        # t' = t − T/n for the config's spacing (diffusers', whatever the spacing), the next timestep for ComfyUI's
        # schedules; a step below t = 0 lands on ᾱ_0, not 1 (SD's set_alpha_to_one=False).
        if self.scheduler == "normal":
            prev = timesteps - self.config.num_train_timesteps // len(timesteps)
        else:
            prev = torch.cat([timesteps[1:], timesteps.new_full((1,), -1)])
        a_t = self.alphas_cumprod[timesteps].double()
        a_prev = self.alphas_cumprod[prev.clamp(min=0)].double()
        std = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        self._alpha, self._sigma = a_t.sqrt().tolist(), (1 - a_t).sqrt().tolist()
        self._alpha_prev = a_prev.sqrt().tolist()
        self._dir = (1 - a_prev - std**2).sqrt().tolist()
        self._std = std.tolist()

    def _step(self, model_output, sample, i, generator):
        x0, eps = self._predict(model_output, sample, self._alpha[i], self._sigma[i])
        prev_sample = self._alpha_prev[i] * x0 + self._dir[i] * eps
        if self._std[i] > 0:
            prev_sample = prev_sample + self._std[i] * self._noise(sample, generator)
        return prev_sample
