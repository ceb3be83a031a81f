"""DPM-Solver++(2M) (Lu et al. 2022), the fast deterministic default."""

import torch

from . import schedules
from .base import Sampler


class DPMSolverPP2MSampler(Sampler):
    """Lu et al. 2022 Alg. 2 (multistep, data prediction, midpoint), first order on the first and the last step."""

    def _make_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        if self.config.timestep_spacing == "leading":
            if not 1 <= num_inference_steps <= self.max_steps:  # n + 1 intervals must fit; say so in n's terms
                raise ValueError(f"num_inference_steps must be an integer between 1 and {self.max_steps} for this "
                                 f"sampler and schedule, got {num_inference_steps!r}.")
            # diffusers' DPM-Solver leads over n + 1 intervals and drops the one ending near t = 0
            return schedules.timesteps(self.config, num_inference_steps + 1)[:-1]
        return schedules.timesteps(self.config, num_inference_steps)

    @property
    def max_steps(self) -> int:
        return super().max_steps - (self.config.timestep_spacing == "leading")

    def _prepare(self, timesteps: torch.Tensor):
        s = schedules.sigmas(self.alphas_cumprod, timesteps).double()  # Karras σ, last one 0
        alpha = (s**2 + 1).rsqrt()  # VP α_t, σ_t = σ α_t
        lam = -s.log()  # λ_t = log(α_t/σ_t); +∞ at σ = 0
        h = lam[1:] - lam[:-1]
        # x_{t_{i+1}} = (σ_{i+1}/σ_i) x_{t_i} − α_{i+1}(e^{−h_i} − 1) D_i  (Alg. 2; = x̂_0 on the last step, σ = 0)
        self._ratio = (s[1:] * alpha[1:] / (s[:-1] * alpha[:-1])).tolist()
        self._coef = (-alpha[1:] * torch.expm1(-h)).tolist()
        self._r = torch.cat([h.new_ones(1), h[:-1] / h[1:]]).tolist()  # r_i = h_{i−1}/h_i
        self._alpha, self._sigma = alpha[:-1].tolist(), (s * alpha)[:-1].tolist()
        self._last = len(timesteps) - 1
        self._prev_x0 = None

    def _step(self, model_output, sample, i, generator):
        x0, _ = self._predict(model_output, sample, self._alpha[i], self._sigma[i])
        d = x0
        if self._prev_x0 is not None and i < self._last:
            # second order: D = x̂_0 + (x̂_0 − x̂_0,prev)/(2 r)
            d = x0 + (x0 - self._prev_x0) / (2 * self._r[i])
        self._prev_x0 = x0
        return self._ratio[i] * sample + self._coef[i] * d
