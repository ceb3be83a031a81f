"""Classifier-free guidance (Ho & Salimans 2022): sampling-time combination and training-time caption dropout."""
from __future__ import annotations

import torch


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """ε̂ = ε_u + s·(ε_c − ε_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def drop_captions(texts: list[str], rate: float, generator: torch.Generator) -> list[str]:
    """Training half of CFG: each caption becomes "" with probability `rate`, teaching the unconditional ε(x_t, ∅)."""
    keep = torch.rand(len(texts), generator=generator) >= rate
    return [text if k else "" for text, k in zip(texts, keep.tolist())]


def rescale_guidance(eps_cfg: torch.Tensor, eps_cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2023 eq. 15–16: rescale the guided prediction to the conditional one's std (per image), then mix
    φ of it with 1 − φ of the plain guided one — fixes over-exposure with zero-terminal-SNR / v-prediction models."""
    dims = tuple(range(1, eps_cfg.ndim))
    rescaled = eps_cfg * (eps_cond.std(dim=dims, keepdim=True) / eps_cfg.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * eps_cfg


def unconditional_skips(sigmas: list[float], start: int, min_sigma: float, all_steps: bool) -> list[bool]:
    """A1111's "Negative Guidance minimum sigma" (NGMS): which steps of `sigmas` (n + 1 levels, the last 0) run the
    conditional pass alone (guidance 1), as CFG adds little but edge overshoot once the image is nearly clean
    (Kynkäänniemi et al. 2024 limit guidance to an interval for the same reason). A step whose σ is below
    `min_sigma` skips it: every step with `all_steps`, else every other one counted from `start` (A1111's default)."""
    return [0 < min_sigma and sigma < min_sigma and (all_steps or (i - start) % 2 == 1)
            for i, sigma in enumerate(sigmas[:-1])]
