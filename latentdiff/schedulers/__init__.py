"""Noise schedules and samplers; diffusers' schedulers are the test oracle, never a runtime dependency.

The registry below is the one place that knows each sampler: its name (ComfyUI's, used by the API, the CLI and
the PNG metadata), its class, its AUTOMATIC1111 display name, the options its constructor takes and the noise
schedules (ComfyUI's "scheduler" names, `SCHEDULERS`) it runs.
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
from .schedules import SCHEDULERS, ScheduleConfig


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    cls: type[Sampler]
    a1111: str  # the name A1111 writes in a PNG's "Sampler:" field
    stochastic: bool  # draws fresh noise every step (its image depends on the per-image generators)
    options: dict  # constructor options and their defaults, e.g. DDIM's {"eta": 0.0}
    schedulers: tuple[str, ...] = ("normal",)  # the noise schedules it runs (a subset of SCHEDULERS)


def _spec(name: str, cls: type[Sampler], a1111: str, *, stochastic: bool, options: dict) -> SamplerSpec:
    # σ-space samplers run every schedule; DDIM/DDPM only those that land on training timesteps
    return SamplerSpec(name, cls, a1111, stochastic, options, schedules.supported(cls.family))


SAMPLERS: dict[str, SamplerSpec] = {spec.name: spec for spec in (
    _spec("ddim", DDIMSampler, "DDIM", stochastic=False, options={"eta": 0.0}),
    _spec("ddpm", DDPMSampler, "DDPM", stochastic=True, options={}),
    _spec("dpmpp_2m", DPMSolverPP2MSampler, "DPM++ 2M", stochastic=False, options={}),
    _spec("euler", EulerSampler, "Euler", stochastic=False, options={}),
    _spec("euler_ancestral", EulerAncestralSampler, "Euler a", stochastic=True, options={}),
)}


def check_sampler(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def check_scheduler(sampler: str, scheduler: str | None, config: ScheduleConfig | None = None) -> str:
    """The noise schedule `sampler` will run: `scheduler` if the sampler supports it (else one sentence naming
    both), or with None the model's default (`config.default_scheduler`), falling back to "normal" for a sampler
    that cannot run it (as diffusers' DDIM/DDPM ignore use_karras_sigmas)."""
    spec = check_sampler(sampler)
    if scheduler is None:
        default = config.default_scheduler if config is not None else "normal"
        return default if default in spec.schedulers else "normal"
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of: {', '.join(SCHEDULERS)}")
    if scheduler not in spec.schedulers:
        raise ValueError(f"sampler {sampler!r} does not support the {scheduler!r} scheduler; "
                         f"it supports: {', '.join(spec.schedulers)}")
    return scheduler


def get_sampler(name: str, config: ScheduleConfig, scheduler: str | None = None, **options) -> Sampler:
    """Build a sampler by name, on noise schedule `scheduler` (None: the model's default, see check_scheduler).
    Options it does not take are refused unless they hold the neutral value (e.g. eta=0 for a sampler without
    eta), so one call site serves every sampler."""
    spec = check_sampler(name)
    scheduler = check_scheduler(name, scheduler, config)
    for key, value in options.items():
        if key not in spec.options and value:
            raise ValueError(f"sampler {name!r} takes no {key} (got {value!r}); only {', '.join(spec.options) or 'no options'}")
    return spec.cls(config, scheduler=scheduler, **{k: v for k, v in options.items() if k in spec.options})


# A1111's "Schedule type" names; "Automatic" (its default) is the model's own schedule
SCHEDULE_A1111 = {"normal": "Normal", "karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
                  "simple": "Simple", "ddim_uniform": "DDIM"}


def from_a1111(name: str) -> str:
    """latentdiff's name for an A1111 display name ("Euler a" → "euler_ancestral"); our own names pass through."""
    return from_a1111_combined(name)[0]


def from_a1111_combined(name: str) -> tuple[str, str | None]:
    """(sampler, schedule or None) from A1111's sampler names, old and new: "DPM++ 2M Karras" (before A1111 1.9 the
    schedule was part of the name), "k_dpmpp_2m" (its API's old names), "Euler a", or latentdiff's own names."""
    by_display = {spec.a1111.lower(): spec.name for spec in SAMPLERS.values()}
    key = name.strip().lower()
    for schedule, display in SCHEDULE_A1111.items():
        if key.endswith(" " + display.lower()) and key[: -len(display) - 1] in by_display:
            return by_display[key[: -len(display) - 1]], schedule
    if key.startswith("k_"):  # k_dpmpp_2m, k_euler_a, k_euler
        key = {"euler_a": "euler_ancestral"}.get(key[2:], key[2:])
        return (key if key in SAMPLERS else name), None
    return by_display.get(key, name), None


def schedule_from_a1111(name: str) -> str | None:
    """latentdiff's schedule for an A1111 "Schedule type" ("Karras" → "karras"); None for "Automatic"."""
    by_display = {display.lower(): schedule for schedule, display in SCHEDULE_A1111.items()} | {"uniform": "normal"}
    key = name.strip().lower()
    return None if key == "automatic" else by_display.get(key, key)


__all__ = ["SAMPLERS", "SCHEDULERS", "Sampler", "SamplerSpec", "ScheduleConfig", "check_sampler", "check_scheduler",
           "from_a1111", "from_a1111_combined", "get_sampler", "randn", "schedule_from_a1111", "schedules",
           "SCHEDULE_A1111"]
