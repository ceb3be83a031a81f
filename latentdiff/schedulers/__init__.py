"""Noise schedules and samplers; diffusers' schedulers are the test oracle, never a runtime dependency."""

from . import schedules
from .base import Sampler, randn
from .ddim import DDIMSampler
from .ddpm import DDPMSampler
from .dpmpp_2m import DPMSolverPP2MSampler
from .euler import EulerSampler
from .euler_ancestral import EulerAncestralSampler
from .schedules import ScheduleConfig

SAMPLERS: dict[str, type] = {
    "ddpm": DDPMSampler,
    "ddim": DDIMSampler,
    "dpmpp_2m": DPMSolverPP2MSampler,
    "euler": EulerSampler,
    "euler_ancestral": EulerAncestralSampler,
}


def get_sampler(name: str, config: ScheduleConfig, **kwargs) -> Sampler:
    """Build a sampler by name; kwargs go to its constructor (e.g. eta for "ddim")."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name](config, **kwargs)


__all__ = ["SAMPLERS", "Sampler", "ScheduleConfig", "get_sampler", "randn", "schedules"]
