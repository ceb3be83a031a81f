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
