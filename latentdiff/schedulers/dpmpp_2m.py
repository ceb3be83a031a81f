"""DPM-Solver++(2M) (Lu et al. 2022), the fast deterministic default."""

import torch

from .base import Sampler


class DPMSolverPP2MSampler(Sampler):
    """Lu et al. 2022 Alg. 2 (multistep, data prediction, midpoint), first order on the first and the last step.

    Follows diffusers' DPMSolverMultistepScheduler: σ schedules span the whole training range and the UNet sees
    their rounded timesteps (int64), while the solver steps between the exact σ.
    """

    family = "dpm"

    def _prepare(self, timesteps: torch.Tensor, sigmas: torch.Tensor):
        s = sigmas.double()  # σ per step, last one 0
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

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = α x_0 + α σ ε with α = 1/√(σ² + 1) (diffusers' DPMSolverMultistepScheduler.add_noise), σ the
        schedule's where t is one of its timesteps (a karras σ, not that of its rounded t), else the training σ_t."""
        sigma = self._sigma_at(t, x0)
        alpha = (sigma**2 + 1).rsqrt()
        return (alpha.to(x0.dtype) * x0 + (alpha * sigma).to(x0.dtype) * noise)

    def _step(self, model_output, sample, i, generator):
        x0, _ = self._predict(model_output, sample, self._alpha[i], self._sigma[i])
        d = x0
        if self._prev_x0 is not None and i < self._last:
            # second order: D = x̂_0 + (x̂_0 − x̂_0,prev)/(2 r)
            d = x0 + (x0 - self._prev_x0) / (2 * self._r[i])
        self._prev_x0 = x0
        return self._ratio[i] * sample + self._coef[i] * d
