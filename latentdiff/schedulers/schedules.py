"""Noise schedules: the config, β/ᾱ/σ tables and the forward process, as pure tensor functions."""

import dataclasses
import math
from dataclasses import dataclass

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing")

# diffusers keys that change the schedule but that we do not implement: refusing them beats sampling wrongly.
_UNSUPPORTED = {"trained_betas": None, "rescale_betas_zero_snr": False}


@dataclass
class ScheduleConfig:
    """The discrete-time training schedule a model was trained with (defaults: Stable Diffusion 1.x/2.x)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1

    def __post_init__(self):
        for name, allowed in (
            ("beta_schedule", BETA_SCHEDULES),
            ("prediction_type", PREDICTION_TYPES),
            ("timestep_spacing", TIMESTEP_SPACINGS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not supported; expected one of: {', '.join(allowed)}.")
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {self.num_train_timesteps!r}.")
        if not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise ValueError(f"steps_offset must be a non-negative integer, got {self.steps_offset!r}.")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}.")

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "ScheduleConfig":
        """Read a diffusers scheduler_config.json dict; keys we do not model are ignored."""
        for key, default in _UNSUPPORTED.items():
            if cfg.get(key, default) != default:
                raise ValueError(f"scheduler config sets {key}={cfg[key]!r}, which latentdiff does not support; expected {default!r}.")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})

    def to_diffusers(self) -> dict:
        """Keys every diffusers discrete-time scheduler accepts in `from_config`."""
        return dataclasses.asdict(self)


def betas(config: ScheduleConfig) -> torch.Tensor:
    """β_1..β_T as float32, computed exactly as diffusers does so ᾱ tables agree bit for bit."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":  # Ho et al. 2020
        return torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
    if config.beta_schedule == "scaled_linear":  # LDM (Rombach et al. 2022): linear in √β
        return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float32) ** 2
    # squaredcos_cap_v2, Nichol & Dhariwal 2021 eq. 17: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), s = 0.008, β ≤ 0.999
    alpha_bar = [math.cos((i / n + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(n + 1)]
    return torch.tensor([min(1 - alpha_bar[i + 1] / alpha_bar[i], 0.999) for i in range(n)], dtype=torch.float32)


def alphas_cumprod(config: ScheduleConfig) -> torch.Tensor:
    """ᾱ_t = ∏_{s≤t} (1 − β_s), float32 on the CPU."""
    return torch.cumprod(1.0 - betas(config), dim=0)


def timesteps(config: ScheduleConfig, num_inference_steps: int) -> torch.Tensor:
    """Descending training timesteps for sampling; "leading"/"trailing" as in Lin et al. 2023, Table 2."""
    n, limit = num_inference_steps, max_inference_steps(config)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
        raise ValueError(f"num_inference_steps must be an integer between 1 and {limit} for this schedule "
                         f"({config.num_train_timesteps} training steps, {config.timestep_spacing} spacing), got {n!r}.")
    return _spaced(config, n)


def _spaced(config: ScheduleConfig, n: int) -> torch.Tensor:
    T = config.num_train_timesteps
    if config.timestep_spacing == "leading":
        return torch.arange(n - 1, -1, -1, dtype=torch.int64) * (T // n) + config.steps_offset
    # trailing: start exactly at T−1 so the first step sees the last training noise level. The stride is
    # rounded the way numpy.arange rounds it, so timesteps equal diffusers' for every n (without its extra
    # t = −1 step that np.arange(T, 0, −T/n) produces for some n, e.g. 61).
    stride = (T - T / n) - T
    return (T + torch.arange(n, dtype=torch.float64) * stride).round().long() - 1


def max_inference_steps(config: ScheduleConfig) -> int:
    """The most steps whose timesteps all lie in 0 … T−1: T for trailing spacing; with leading spacing
    steps_offset pushes the first timestep of a long schedule past T−1 (1000 steps, offset 1 → t = 1000)."""
    T = config.num_train_timesteps
    if config.timestep_spacing == "trailing":
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
    sigma = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return torch.cat([sigma[timesteps.cpu()], sigma.new_zeros(1)])


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


def add_noise_sigma(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The same noise level in σ-space (Karras et al. 2022): x = x_0 + σ_t ε = x_t / √ᾱ_t, σ_t = √((1 − ᾱ_t)/ᾱ_t)."""
    a = _alpha_bar(alphas_cumprod, t, x0)
    return x0 + ((1 - a) / a).sqrt().to(x0.dtype) * noise


def get_velocity(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """v-prediction target, Salimans & Ho 2022 sec. 4: v = √ᾱ_t ε − √(1 − ᾱ_t) x_0."""
    a, s = _coefficients(alphas_cumprod, t, x0)
    return a * noise - s * x0


def snr(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) (Kingma et al. 2021), float32 on t's device."""
    a = alphas_cumprod.to(t.device)[t]
    return a / (1 - a)
