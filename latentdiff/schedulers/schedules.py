"""Noise schedules: the config, β/ᾱ/σ tables, the inference schedules and the forward process, as pure functions.

An inference schedule is the timesteps the UNet sees and the noise level σ = √((1 − ᾱ)/ᾱ) of each step, ending
at σ = 0. Schedules carry ComfyUI's names (`SCHEDULERS`): "normal" is the model's own timestep spacing
(`ScheduleConfig.timestep_spacing`) as diffusers applies it; "karras" and "exponential" are k-diffusion's
get_sigmas_karras and get_sigmas_exponential; "sgm_uniform", "simple" and "ddim_uniform" are ComfyUI's
(comfy/samplers.py). `plan` is the one place that turns (config, steps, schedule, sampler family) into a
`Schedule`; each family follows its diffusers counterpart's conventions to the letter (where the σ range comes
from, whether timesteps are rounded), so every sampler agrees with diffusers given the same config flags.
"""

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SCHEDULERS = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform")
# The schedules a diffusers config can make a model's default (use_karras_sigmas, use_exponential_sigmas).
DEFAULT_SCHEDULERS = ("normal", "karras", "exponential")
# Sampler families, named after the diffusers scheduler whose conventions they follow:
#   discrete — DDIM/DDPM: integer training timesteps only, so only schedules that land on them;
#   euler    — EulerDiscreteScheduler: σ between training steps, the UNet sees unrounded t;
#   dpm      — DPMSolverMultistepScheduler: "leading"/"linspace" over n + 1 intervals, σ schedules over the whole
#              training range with rounded (integer) t.
FAMILIES = {
    "discrete": ("normal", "simple", "ddim_uniform"),
    "euler": SCHEDULERS,
    "dpm": SCHEDULERS,
}

# diffusers scheduler-config keys that change sampling but that latentdiff does not implement, each with the
# values under which it changes nothing here (diffusers' neutral setting, or what latentdiff does anyway).
# Any other value is named in one warning by `ScheduleConfig.from_diffusers`.
_NOT_HONOURED = {
    "use_beta_sigmas": (False, None),
    "use_lu_lambdas": (False, None),
    "use_flow_sigmas": (False, None),
    "use_dynamic_shifting": (False, None),
    "timestep_type": ("discrete",),
    "final_sigmas_type": ("zero",),
    "interpolation_type": ("linear",),
    "sigma_min": (None,),
    "sigma_max": (None,),
    "thresholding": (False,),
    "clip_sample": (False,),
    "set_alpha_to_one": (False,),  # DDIM's step below t = 0 lands on ᾱ_0 (SD's setting), never on ᾱ = 1
    "variance_type": (None, "fixed_small", "fixed_small_log"),  # DDPM's posterior variance (None: DPM-Solver's)
    "solver_order": (2,),  # DPM-Solver settings: dpmpp_2m is second order, data prediction, midpoint
    "algorithm_type": ("dpmsolver++",),
    "solver_type": ("midpoint",),
    "euler_at_final": (False,),
    "lambda_min_clipped": (-math.inf,),
}


def unhonoured(cfg: dict) -> dict:
    """The keys of a diffusers scheduler config that would change sampling but that latentdiff ignores, with values."""
    return {key: cfg[key] for key, neutral in _NOT_HONOURED.items() if key in cfg and cfg[key] not in neutral}


@dataclass
class ScheduleConfig:
    """The discrete-time training schedule a model was trained with (defaults: Stable Diffusion 1.x/2.x), and the
    noise schedule its samplers use unless the caller names another."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    default_scheduler: str = "normal"  # diffusers' use_karras_sigmas → "karras", use_exponential_sigmas → "exponential"
    rescale_betas_zero_snr: bool = False  # Lin et al. 2023, Alg. 1: β rescaled so that ᾱ_T = 0
    trained_betas: tuple[float, ...] | None = None  # β_1..β_T given outright (beta_start/end/schedule unused)

    def __post_init__(self):
        for name, allowed in (
            ("beta_schedule", BETA_SCHEDULES),
            ("prediction_type", PREDICTION_TYPES),
            ("timestep_spacing", TIMESTEP_SPACINGS),
            ("default_scheduler", DEFAULT_SCHEDULERS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not supported; expected one of: {', '.join(allowed)}.")
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {self.num_train_timesteps!r}.")
        if not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise ValueError(f"steps_offset must be a non-negative integer, got {self.steps_offset!r}.")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}.")
        if not isinstance(self.rescale_betas_zero_snr, bool):
            raise ValueError(f"rescale_betas_zero_snr must be true or false, got {self.rescale_betas_zero_snr!r}.")
        if self.trained_betas is not None:
            self.trained_betas = tuple(float(b) for b in self.trained_betas)
            if len(self.trained_betas) != self.num_train_timesteps or not all(0 < b <= 1 for b in self.trained_betas):
                raise ValueError(f"trained_betas must hold num_train_timesteps ({self.num_train_timesteps}) values in (0, 1], "
                                 f"got {len(self.trained_betas)} values.")

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "ScheduleConfig":
        """Read a diffusers scheduler_config.json dict.

        use_karras_sigmas / use_exponential_sigmas become `default_scheduler`. Keys that would change sampling but
        that latentdiff does not implement (`unhonoured`) are named in one logging warning; keys that change
        nothing here (_class_name, clip_sample false, skip_prk_steps, …) are ignored silently.
        """
        karras, exponential = bool(cfg.get("use_karras_sigmas")), bool(cfg.get("use_exponential_sigmas"))
        if karras and exponential:
            raise ValueError("scheduler config sets both use_karras_sigmas and use_exponential_sigmas; expected at most one.")
        ignored = unhonoured(cfg)
        if ignored:
            logger.warning("scheduler config: latentdiff does not honour %s; sampling may differ from diffusers' with this config.",
                           ", ".join(f"{key}={value!r}" for key, value in ignored.items()))
        names = {f.name for f in dataclasses.fields(cls)} - {"default_scheduler"}
        kwargs = {k: v for k, v in cfg.items() if k in names}
        kwargs["rescale_betas_zero_snr"] = bool(cfg.get("rescale_betas_zero_snr"))
        kwargs["default_scheduler"] = "karras" if karras else "exponential" if exponential else "normal"
        return cls(**kwargs)

    def to_diffusers(self) -> dict:
        """The diffusers scheduler-config keys of this schedule (from_diffusers reads them back unchanged); the
        default schedule and the optional keys appear only where they differ from diffusers' defaults."""
        out = dataclasses.asdict(self)
        default, rescale, trained = out.pop("default_scheduler"), out.pop("rescale_betas_zero_snr"), out.pop("trained_betas")
        if default != "normal":
            out[f"use_{default}_sigmas"] = True
        if rescale:
            out["rescale_betas_zero_snr"] = True
        if trained is not None:
            out["trained_betas"] = list(trained)
        return out


def betas(config: ScheduleConfig) -> torch.Tensor:
    """β_1..β_T as float32, computed exactly as diffusers does so ᾱ tables agree bit for bit."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        b = torch.tensor(config.trained_betas, dtype=torch.float32)
    elif config.beta_schedule == "linear":  # Ho et al. 2020
        b = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":  # LDM (Rombach et al. 2022): linear in √β
        b = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float32) ** 2
    else:  # squaredcos_cap_v2, Nichol & Dhariwal 2021 eq. 17: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), s = 0.008, β ≤ 0.999
        alpha_bar = [math.cos((i / n + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(n + 1)]
        b = torch.tensor([min(1 - alpha_bar[i + 1] / alpha_bar[i], 0.999) for i in range(n)], dtype=torch.float32)
    return rescale_zero_terminal_snr(b) if config.rescale_betas_zero_snr else b


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Alg. 1: shift and scale √ᾱ_t so that √ᾱ_T = 0 and √ᾱ_1 is unchanged (zero terminal SNR)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    return 1 - torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])


def alphas_cumprod(config: ScheduleConfig, *, sigma_space: bool = False) -> torch.Tensor:
    """ᾱ_t = ∏_{s≤t} (1 − β_s), float32 on the CPU.

    With a zero terminal SNR, ᾱ_T = 0 puts σ_T at infinity; the σ-space samplers (`sigma_space`, diffusers' Euler
    and DPM-Solver) use ᾱ_T = 2⁻²⁴ instead, as diffusers does, while DDIM/DDPM keep ᾱ_T = 0.
    """
    a = torch.cumprod(1.0 - betas(config), dim=0)
    if sigma_space and config.rescale_betas_zero_snr:
        a[-1] = 2**-24
    return a


def timesteps(config: ScheduleConfig, num_inference_steps: int) -> torch.Tensor:
    """Descending training timesteps for sampling; "leading"/"trailing"/"linspace" as in Lin et al. 2023, Table 2."""
    n, limit = num_inference_steps, max_inference_steps(config)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
        raise ValueError(f"num_inference_steps must be an integer between 1 and {limit} for this schedule "
                         f"({config.num_train_timesteps} training steps, {config.timestep_spacing} spacing), got {n!r}.")
    return _spaced(config, n)


def _spaced(config: ScheduleConfig, n: int) -> torch.Tensor:
    T = config.num_train_timesteps
    if config.timestep_spacing == "leading":
        return torch.arange(n - 1, -1, -1, dtype=torch.int64) * (T // n) + config.steps_offset
    if config.timestep_spacing == "linspace":  # n points from T−1 down to 0, rounded half to even (numpy's round)
        return _linspace(0, T - 1, n).round().long().flip(0)
    # trailing: start exactly at T−1 so the first step sees the last training noise level. The stride is
    # rounded the way numpy.arange rounds it, so timesteps equal diffusers' for every n (without its extra
    # t = −1 step that np.arange(T, 0, −T/n) produces for some n, e.g. 61).
    stride = (T - T / n) - T
    return (T + torch.arange(n, dtype=torch.float64) * stride).round().long() - 1


def max_inference_steps(config: ScheduleConfig) -> int:
    """The most steps whose timesteps all lie in 0 … T−1: T for trailing and linspace spacing; with leading spacing
    steps_offset pushes the first timestep of a long schedule past T−1 (1000 steps, offset 1 → t = 1000)."""
    T = config.num_train_timesteps
    if config.timestep_spacing != "leading":
        return T
    n = torch.arange(1, T + 1)
    fits = (n - 1) * (T // n) + config.steps_offset <= T - 1
    return int(fits.cumprod(0).sum())


def check_strength(strength) -> None:
    """Image-to-image strength: the share of the schedule that is run, in (0, 1]."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1] (the share of the steps that is run), got {strength!r}")


def start_index(num_inference_steps: int, strength: float) -> int:
    """Where image-to-image starts in the timesteps: int(steps·strength) steps run, the last ones of the schedule
    (diffusers' get_timesteps; A1111 runs one more, int(min(strength, 0.999)·steps) + 1)."""
    check_strength(strength)
    run = min(int(num_inference_steps * strength), num_inference_steps)
    if run < 1:
        raise ValueError(f"strength {strength:g} runs int({num_inference_steps} × {strength:g}) = 0 of the "
                         f"{num_inference_steps} steps; raise strength or num_inference_steps")
    return num_inference_steps - run


def sigmas(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Karras et al. 2022 noise levels σ_t = √((1 − ᾱ_t)/ᾱ_t) at the timesteps, plus a final σ = 0."""
    sigma = sigma_table(alphas_cumprod)
    return torch.cat([sigma[timesteps.cpu()], sigma.new_zeros(1)])


def sigma_table(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) for t = 0 … T−1, ascending, in ᾱ's dtype (float32, as diffusers)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


# --- Inference schedules --------------------------------------------------------------------------------------------


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5 (k-diffusion's get_sigmas_karras): n levels from σ_max to σ_min evenly spaced in
    σ^(1/ρ), then 0; float64."""
    ramp = _linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """k-diffusion's get_sigmas_exponential: n levels from σ_max to σ_min evenly spaced in log σ, then 0; float64."""
    return _append_zero(_linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def sgm_uniform_timesteps(num_train_timesteps: int, n: int) -> torch.Tensor:
    """ComfyUI's sgm_uniform: n + 1 points evenly spaced from T−1 to 0, the last (t = 0) dropped; float64."""
    return _linspace(num_train_timesteps - 1, 0, n + 1)[:-1]


def simple_timesteps(num_train_timesteps: int, n: int) -> torch.Tensor:
    """ComfyUI's simple: every (T/n)-th training step counted down from T−1, t_x = T − 1 − ⌊x·T/n⌋; int64."""
    stride = num_train_timesteps / n
    return torch.tensor([num_train_timesteps - 1 - int(x * stride) for x in range(n)], dtype=torch.int64)


def ddim_uniform_timesteps(num_train_timesteps: int, n: int) -> torch.Tensor:
    """ComfyUI's ddim_uniform: 1, 1 + s, 1 + 2s, … below T with s = ⌊T/n⌋, descending; int64. When s does not
    divide T − 1 evenly this is one step more than n (ComfyUI's own count: 8 steps for n = 7 of T = 1000)."""
    stride = max(num_train_timesteps // n, 1)
    return torch.arange(1, num_train_timesteps, stride, dtype=torch.int64).flip(0)


def sigma_to_t(sigma: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The (fractional) timestep of each σ: linear interpolation in log σ between neighbouring training steps
    (diffusers' `_sigma_to_t`, k-diffusion's DiscreteSchedule.sigma_to_t); float64."""
    log_sigmas = table.log()  # float32, as np.log of diffusers' float32 table
    log_sigma = sigma.double().clamp(min=1e-10).log()
    dists = log_sigma[None, :] - log_sigmas.double()[:, None]
    low = (dists >= 0).long().cumsum(0).argmax(0).clamp(max=len(table) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo.double() - log_sigma) / (lo - hi).double()).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


def linear_sigma(t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """σ at fractional timesteps, linear in σ between training steps (diffusers' np.interp); exact at integers; float64."""
    t = t.double()
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=len(table) - 1)
    table, frac = table.double(), t - lo
    # At a training step take the table's σ itself: with zero terminal SNR the last σ is ∞, and ∞ − ∞ is NaN.
    return torch.where(frac == 0, table[lo], (table[hi] - table[lo]) * frac + table[lo])


def log_linear_sigma(t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """σ at fractional timesteps, linear in log σ between training steps (ComfyUI's and k-diffusion's t_to_sigma); float64."""
    t = t.double().clamp(0, len(table) - 1)
    lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
    log_sigmas = table.double().log()
    return ((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp()


@dataclass(frozen=True)
class Schedule:
    """One sampling run's schedule: what the UNet sees at each step and the noise level of each step."""

    timesteps: torch.Tensor  # (n,) descending; int64 where they are training steps, float32 where between them
    sigmas: torch.Tensor  # (n + 1,) float32 σ = √((1 − ᾱ)/ᾱ) of each step, then 0


def supported(family: str) -> tuple[str, ...]:
    """The schedules a sampler family can run (see FAMILIES)."""
    return FAMILIES[family]


def max_steps(config: ScheduleConfig, scheduler: str = "normal", family: str = "discrete") -> int:
    """The most inference steps `plan` accepts: the spacing's limit for "normal" (DPM-Solver's leading and linspace
    place n + 1 intervals), the number of training steps otherwise."""
    if scheduler != "normal":
        return config.num_train_timesteps
    return max_inference_steps(config) - (family == "dpm" and config.timestep_spacing in ("leading", "linspace"))


def plan(config: ScheduleConfig, num_inference_steps: int, scheduler: str = "normal", family: str = "discrete") -> Schedule:
    """The timesteps and σ of `num_inference_steps` steps of `scheduler` for a sampler of `family`.

    normal       the config's timestep spacing; σ_t at them (Euler: linspace unrounded, σ linear between steps;
                 DPM-Solver: leading and linspace over n + 1 intervals, the one ending near 0 dropped).
    karras       Karras et al. 2022 eq. 5, ρ = 7; exponential: log σ evenly spaced. Euler: between the σ of the
                 first and last "normal" timestep, t = sigma_to_t(σ) unrounded (diffusers' EulerDiscreteScheduler
                 with use_karras_sigmas / use_exponential_sigmas). DPM-Solver: between σ_0 and σ_{T−1} (k-diffusion's
                 and ComfyUI's range), t rounded for karras (truncated with the cosine schedule, as diffusers) and
                 truncated for exponential (diffusers' DPMSolverMultistepScheduler, int64 timesteps).
    sgm_uniform  ComfyUI: t evenly spaced from T−1 over n + 1 points, σ log-linear between steps; t rounded for DPM-Solver.
    simple       ComfyUI: t_x = T − 1 − ⌊x·T/n⌋, σ_t.
    ddim_uniform ComfyUI: t = 1, 1 + ⌊T/n⌋, … (can be n + 1 steps), σ_t.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown sampler family {family!r}; expected one of: {', '.join(FAMILIES)}.")
    if scheduler not in FAMILIES[family]:
        raise ValueError(f"the {scheduler!r} noise schedule does not apply to {family} samplers; expected one of: "
                         f"{', '.join(FAMILIES[family])}.")
    n, limit = num_inference_steps, max_steps(config, scheduler, family)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
        raise ValueError(f"num_inference_steps must be an integer between 1 and {limit} for this sampler and schedule "
                         f"({config.num_train_timesteps} training steps, {scheduler} schedule, {config.timestep_spacing} "
                         f"spacing), got {n!r}.")
    T = config.num_train_timesteps
    table = sigma_table(alphas_cumprod(config, sigma_space=family != "discrete"))  # float32, ascending in t
    if scheduler == "normal":
        t = _normal_timesteps(config, n, family)
        sigma = linear_sigma(t, table)
    elif scheduler in ("karras", "exponential"):
        if family == "euler":
            spaced = linear_sigma(_normal_timesteps(config, n, family), table)
            sigma_min, sigma_max = spaced[-1].item(), spaced[0].item()
        else:
            sigma_min, sigma_max = table[0].item(), table[-1].item()
        sigma = (karras_sigmas if scheduler == "karras" else exponential_sigmas)(n, sigma_min, sigma_max)[:-1]
        t = sigma_to_t(sigma, table)
        if family == "dpm":
            rounded = scheduler == "karras" and config.beta_schedule != "squaredcos_cap_v2"
            t = (t.round() if rounded else t).long()  # .long() truncates, as diffusers' cast to int64
        else:
            t = t.float()
    elif scheduler == "sgm_uniform":
        t = sgm_uniform_timesteps(T, n)
        sigma = log_linear_sigma(t, table)
        t = t.round().long() if family == "dpm" else t.float()
    else:
        t = (simple_timesteps if scheduler == "simple" else ddim_uniform_timesteps)(T, n)
        sigma = table[t].double()
    return Schedule(t, _append_zero(sigma.float()))


def _normal_timesteps(config: ScheduleConfig, n: int, family: str) -> torch.Tensor:
    if family == "euler" and config.timestep_spacing == "linspace":  # unrounded, float32 (diffusers' Euler)
        return _linspace(0, config.num_train_timesteps - 1, n).float().flip(0)
    if family == "dpm" and config.timestep_spacing in ("leading", "linspace"):
        return _spaced(config, n + 1)[:-1]  # diffusers' DPM-Solver: n + 1 intervals, the one ending near 0 dropped
    return _spaced(config, n)


def _linspace(start: float, stop: float, n: int) -> torch.Tensor:
    """numpy.linspace in float64, operation for operation (start + i·step, the last point exactly `stop`), so rounded
    timesteps and the σ derived from them equal diffusers' bit for bit."""
    if n == 1:
        return torch.tensor([float(start)], dtype=torch.float64)
    y = torch.arange(n, dtype=torch.float64) * ((stop - start) / (n - 1)) + start
    y[-1] = stop
    return y


def _append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(1)])


# --- The forward process --------------------------------------------------------------------------------------------


def _alpha_bar(alphas_cumprod: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """ᾱ_t for a per-batch t, shaped (B, 1, …) to broadcast against x, float32 on x's device."""
    return alphas_cumprod.to(x.device)[t.to(x.device)].view((-1,) + (1,) * (x.ndim - 1))


def _coefficients(alphas_cumprod: torch.Tensor, t: torch.Tensor, x: torch.Tensor):
    """(√ᾱ_t, √(1 − ᾱ_t)) in x's dtype."""
    a = _alpha_bar(alphas_cumprod, t, x)
    return a.sqrt().to(x.dtype), (1 - a).sqrt().to(x.dtype)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x_0), Ho et al. 2020 eq. 4: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε."""
    a, s = _coefficients(alphas_cumprod, t, x0)
    return a * x0 + s * noise


def get_velocity(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """v-prediction target, Salimans & Ho 2022 sec. 4: v = √ᾱ_t ε − √(1 − ᾱ_t) x_0."""
    a, s = _coefficients(alphas_cumprod, t, x0)
    return a * noise - s * x0


def snr(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) (Kingma et al. 2021), float32 on t's device."""
    a = alphas_cumprod.to(t.device)[t]
    return a / (1 - a)
