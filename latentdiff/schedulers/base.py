"""The contract every sampler shares, and per-image noise."""

import torch

from . import schedules
from .schedules import ScheduleConfig


def randn(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Gaussian noise drawn like diffusers' `randn_tensor`: a list of generators seeds each batch element on its own.

    Element i is `torch.randn(shape[1:], generator=generator[i])`, so an image never depends on its batch position.
    CPU generators draw on the CPU and the result moves to `device`, so seeds reproduce across devices.
    """
    device = torch.device(device or "cpu")
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; expected one per batch element.")
        if len(generator) == 1:
            generator = generator[0]
    first = generator[0] if isinstance(generator, list) else generator
    rand_device = torch.device("cpu") if first is not None and first.device.type == "cpu" else device
    if isinstance(generator, list):
        noise = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=rand_device, dtype=dtype) for g in generator])
    else:
        noise = torch.randn(shape, generator=generator, device=rand_device, dtype=dtype)
    return noise.to(device)


class Sampler:
    """Discrete-time sampler with diffusers' contract: set_timesteps, scale_model_input, step, add_noise.

    `scheduler` names the noise schedule (schedules.SCHEDULERS) and `family` the diffusers conventions the sampler
    follows (schedules.FAMILIES); `schedules.plan` turns both into timesteps and σ. Per-step scalars are
    precomputed on the host in `set_timesteps` (`_prepare`) and indexed by a step counter, so `step` never
    synchronises with the device.
    """

    family = "discrete"
    init_noise_sigma = 1.0

    def __init__(self, config: ScheduleConfig, scheduler: str = "normal"):
        if scheduler not in schedules.supported(self.family):
            raise ValueError(f"{type(self).__name__} does not run the {scheduler!r} noise schedule; expected one of: "
                             f"{', '.join(schedules.supported(self.family))}.")
        self.config = config
        self.scheduler = scheduler
        self.alphas_cumprod = schedules.alphas_cumprod(config, sigma_space=self.family != "discrete")  # (T,) float32, CPU
        self.timesteps = None
        self.sigmas = None
        self.sigma_list: list[float] = []  # σ per step, then 0, as host floats: per-step choices read no tensor
        self._timestep_list = []
        self._step_index = None

    def set_timesteps(self, num_inference_steps: int, device=None):
        schedule = schedules.plan(self.config, num_inference_steps, self.scheduler, self.family)
        self.timesteps = schedule.timesteps.to(device)
        self.sigmas = schedule.sigmas  # (n + 1,) float32, CPU
        self.sigma_list = schedule.sigmas.tolist()
        self._timestep_list = schedule.timesteps.tolist()
        self._step_index = None
        self._prepare(schedule.timesteps, schedule.sigmas)

    @property
    def max_steps(self) -> int:
        """The most inference steps this sampler can run on its schedule."""
        return schedules.max_steps(self.config, self.scheduler, self.family)

    def _prepare(self, timesteps: torch.Tensor, sigmas: torch.Tensor):
        """Precompute the per-step scalars of the algorithm and reset any multistep state.

        `timesteps` (n,) are what the UNet sees; `sigmas` (n + 1,) float32 are the steps' noise levels, then 0.
        """
        raise NotImplementedError

    def _step(self, model_output: torch.Tensor, sample: torch.Tensor, i: int, generator) -> torch.Tensor:
        """One update x_{t_i} → x_{t_{i+1}} in float32."""
        raise NotImplementedError

    def set_begin_index(self, index: int = 0) -> None:
        """Start the count at step `index` of the schedule, so no step needs to read t back from the device."""
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps() before sampling.")
        if not 0 <= index < len(self._timestep_list):
            raise ValueError(f"begin index {index} is outside this sampler's {len(self._timestep_list)} steps.")
        self._step_index = index

    def _index(self, t) -> int:
        # Without set_begin_index, found from t on the first step only (one host sync per loop, as diffusers'
        # _init_step_index), so a loop may start mid-schedule (img2img); later steps just count. Of repeated
        # timesteps (rounded σ schedules) the second is taken, as diffusers' index_for_timestep.
        if self._step_index is None:
            if self.timesteps is None:
                raise RuntimeError("call set_timesteps() before sampling.")
            t = float(t) if self.timesteps.is_floating_point() else int(t)
            found = [i for i, s in enumerate(self._timestep_list) if s == t]
            if not found:
                raise ValueError(f"timestep {t} is not in this sampler's schedule {self._timestep_list}.")
            self._step_index = found[1] if len(found) > 1 else found[0]
        return self._step_index

    def scale_model_input(self, sample: torch.Tensor, t) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, t, sample: torch.Tensor, generator=None) -> torch.Tensor:
        """Return x at the next (less noisy) timestep; math in float32, result in sample's dtype."""
        i = self._index(t)
        prev_sample = self._step(model_output.float(), sample.float(), i, generator)
        self._step_index = i + 1
        return prev_sample.to(sample.dtype)

    def _predict(self, model_output: torch.Tensor, sample: torch.Tensor, alpha: float, sigma: float):
        """(x̂_0, ε̂) from the network output at x_t = α x_0 + σ ε (α = √ᾱ_t, σ = √(1 − ᾱ_t))."""
        if self.config.prediction_type == "epsilon":
            return (sample - sigma * model_output) / alpha, model_output
        # v = α ε − σ x_0 (Salimans & Ho 2022) ⇒ x_0 = α x_t − σ v, ε = σ x_t + α v
        return alpha * sample - sigma * model_output, sigma * sample + alpha * model_output

    def _noise(self, like: torch.Tensor, generator) -> torch.Tensor:
        return randn(like.shape, generator, like.device, torch.float32)

    def _sigma_at(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """σ per batch element, shaped (B, 1, …) like `like`, float32 on its device, without reading t back: the
        schedule's σ where t is one of this run's timesteps (the second of repeats, as diffusers' add_noise),
        else the training σ_t (linear between training steps)."""
        device = like.device
        t = t.to(device).reshape(-1)
        tf = t.double()
        sigma = schedules.linear_sigma(tf, schedules.sigma_table(self.alphas_cumprod).to(device))
        if self.timesteps is not None:
            match = self.timesteps.to(device).double()[None, :] == tf[:, None]  # (B, n)
            count = match.sum(1, keepdim=True)
            want = torch.where(count > 1, 2, 1)
            pick = (match & (match.long().cumsum(1) == want)).long().argmax(1)
            scheduled = self.sigmas.to(device).double()[pick]
            sigma = torch.where(count[:, 0] > 0, scheduled, sigma)
        return sigma.float().view((-1,) + (1,) * (like.ndim - 1))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t at training timesteps t in this sampler's own parameterisation (variance preserving here)."""
        return schedules.add_noise(x0, noise, t, self.alphas_cumprod)
