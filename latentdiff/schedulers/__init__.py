"""Noise schedules and samplers; diffusers' schedulers are the test oracle, never a runtime dependency.

The registry below is the one place that knows each sampler: its name (ComfyUI's, used by the API, the CLI and
the PNG metadata), its class, its AUTOMATIC1111 display name and the options its constructor takes.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import schedules
from .base import Sampler, randn
from .ddim import DDIMSampler
from .ddpm import DDPMSampler
from .dpmpp_2m import DPMSolverPP2MSampler
from .euler import EulerSampler
from .euler_ancestral import EulerAncestralSampler
from .schedules import ScheduleConfig


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    cls: type[Sampler]
    a1111: str  # the name A1111 writes in a PNG's "Sampler:" field
    stochastic: bool  # draws fresh noise every step (its image depends on the per-image generators)
    options: dict  # constructor options and their defaults, e.g. DDIM's {"eta": 0.0}


SAMPLERS: dict[str, SamplerSpec] = {spec.name: spec for spec in (
    SamplerSpec("ddim", DDIMSampler, "DDIM", stochastic=False, options={"eta": 0.0}),
    SamplerSpec("ddpm", DDPMSampler, "DDPM", stochastic=True, options={}),
    SamplerSpec("dpmpp_2m", DPMSolverPP2MSampler, "DPM++ 2M", stochastic=False, options={}),
    SamplerSpec("euler", EulerSampler, "Euler", stochastic=False, options={}),
    SamplerSpec("euler_ancestral", EulerAncestralSampler, "Euler a", stochastic=True, options={}),
)}


def check_sampler(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def get_sampler(name: str, config: ScheduleConfig, **options) -> Sampler:
    """Build a sampler by name. Options it does not take are refused unless they hold the neutral value
    (e.g. eta=0 for a sampler without eta), so one call site serves every sampler."""
    spec = check_sampler(name)
    for key, value in options.items():
        if key not in spec.options and value:
            raise ValueError(f"sampler {name!r} takes no {key} (got {value!r}); only {', '.join(spec.options) or 'no options'}")
    return spec.cls(config, **{k: v for k, v in options.items() if k in spec.options})


def from_a1111(name: str) -> str:
    """latentdiff's name for an A1111 display name ("Euler a" → "euler_ancestral"); our own names pass through."""
    by_display = {spec.a1111.lower(): spec.name for spec in SAMPLERS.values()}
    return by_display.get(name.lower(), name)


__all__ = ["SAMPLERS", "Sampler", "SamplerSpec", "ScheduleConfig", "check_sampler", "from_a1111", "get_sampler",
           "randn", "schedules"]
