"""Noise schedules (ComfyUI's scheduler names) for every sampler, against diffusers, k-diffusion and ComfyUI.

Loops: each sampler × schedule runs 7 steps on a fake model beside diffusers' scheduler with the same flags
(use_karras_sigmas, use_exponential_sigmas, timestep_spacing, rescale_betas_zero_snr) or, where diffusers has no
flag for a schedule (sgm_uniform, simple, ddim_uniform), on the same σ / timesteps handed to diffusers' own
set_timesteps(sigmas=…) / set_timesteps(timesteps=…). Every intermediate sample agrees within rtol = 1e-5 and
atol = 1e-5 · max(1, max|x_t|) (tests/test_schedulers.py's tolerance; the issue asks for ≤ 1e-4).

k-diffusion (0.1.1.post1) is not a test dependency: installing it would downgrade numpy in the shared venv. Its
get_sigmas_karras, get_sigmas_exponential, sample_euler and sample_dpmpp_2m (k_diffusion/sampling.py) and ComfyUI's
simple_scheduler, ddim_scheduler, normal_scheduler(sgm=True) (comfy/samplers.py) with ModelSamplingDiscrete's
timestep/sigma (comfy/model_sampling.py) are transcribed below, operation for operation.
"""

import json
import logging
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

from latentdiff.schedulers import SAMPLERS, SCHEDULERS, ScheduleConfig, check_scheduler, get_sampler, schedules

STEPS = 7  # not a divisor of 1000: linspace timesteps fall between training steps, ddim_uniform makes 8 steps
TOL = 1e-5

CONFIGS = {
    "sd": ScheduleConfig(),  # scaled_linear, leading, offset 1
    "sd-linspace": ScheduleConfig(timestep_spacing="linspace", steps_offset=0),
    "linear-trailing": ScheduleConfig(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", timestep_spacing="trailing", steps_offset=0),
    "cosine-leading": ScheduleConfig(beta_schedule="squaredcos_cap_v2"),
    "zero-snr": ScheduleConfig(prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=0, rescale_betas_zero_snr=True),
}

DPM = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint", "lower_order_final": True, "final_sigmas_type": "zero"}
FLAGS = {"normal": {}, "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}}

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers


class _FloorDividesTo:
    """T // this = stride, whatever T: makes diffusers' DDIM step t → t − T // num_inference_steps land on t − stride."""

    def __init__(self, stride: int):
        self.stride = stride

    def __rfloordiv__(self, other) -> int:
        return self.stride


class DDIMToNextTimestep(DDIMScheduler):
    """diffusers' DDIM update from each timestep to the next one of the schedule and from the last to ᾱ_0 (its own
    step goes to t − T/n, the next timestep only where the schedule is evenly strided)."""

    def step(self, model_output, timestep, sample, **kwargs):
        ts = self.timesteps.tolist()
        i = ts.index(int(timestep))
        self.num_inference_steps = _FloorDividesTo(ts[i] - (ts[i + 1] if i + 1 < len(ts) else -1))
        return super().step(model_output, timestep, sample, **kwargs)


def oracle(name: str, config: ScheduleConfig, scheduler: str, ours):
    """diffusers' scheduler for (sampler, schedule), after set_timesteps(STEPS) — on our σ or timesteps where
    diffusers has no flag for the schedule."""
    cfg = config.to_diffusers()
    flags = FLAGS.get(scheduler, {})
    if name == "ddim":
        cls = DDIMScheduler if scheduler == "normal" else DDIMToNextTimestep
        ref = cls.from_config({**cfg, "clip_sample": False, "set_alpha_to_one": False})
        ref.set_timesteps(STEPS)
        if scheduler != "normal":
            ref.timesteps = ours.timesteps.clone()
        return ref
    if name == "ddpm":
        ref = DDPMScheduler.from_config({**cfg, "clip_sample": False, "variance_type": "fixed_small"})
        if scheduler == "normal":
            ref.set_timesteps(STEPS)
        else:
            ref.set_timesteps(timesteps=ours.timesteps.tolist())
        return ref
    if name == "dpmpp_2m":
        ref = DPMSolverMultistepScheduler.from_config({**cfg, **DPM, **flags})
        if scheduler in ("simple", "ddim_uniform"):
            ref.set_timesteps(timesteps=ours.timesteps.tolist())
        else:
            ref.set_timesteps(STEPS)
            if scheduler == "sgm_uniform":  # diffusers' DPM-Solver step on ComfyUI's σ (checked on their own below)
                ref.sigmas, ref.timesteps = ours.sigmas.clone(), ours.timesteps.clone()
        return ref
    euler = EulerDiscreteScheduler.from_config({**cfg, "interpolation_type": "linear", **flags})
    if scheduler in FLAGS:
        euler.set_timesteps(STEPS)
    else:
        euler.set_timesteps(sigmas=ours.sigmas.tolist())
    if name == "euler":
        return euler
    ref = EulerAncestralDiscreteScheduler.from_config(cfg)  # no flags of its own: it steps on Euler's schedule
    ref.set_timesteps(STEPS)
    ref.sigmas, ref.timesteps = euler.sigmas.clone(), euler.timesteps.clone()
    return ref


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def fake_model(x: torch.Tensor, t, base: torch.Tensor) -> torch.Tensor:
    """A noise-free stand-in for the UNet: a smooth function of (x, t)."""
    return 0.3 * x + 0.7 * math.cos(float(t) / 150) * base


def run_both(name, config, scheduler, shape=(2, 4, 8, 8)):
    """Both loops side by side; returns the largest difference of any intermediate sample over max(1, max|x|)."""
    ours = get_sampler(name, config, scheduler=scheduler)
    ours.set_timesteps(STEPS)
    ref = oracle(name, config, scheduler, ours)
    assert len(ours.timesteps) == len(ref.timesteps)
    if ours.timesteps.is_floating_point() or ref.timesteps.is_floating_point():
        torch.testing.assert_close(ours.timesteps.double(), ref.timesteps.double(), atol=2e-3, rtol=0)
    else:
        assert ours.timesteps.tolist() == ref.timesteps.tolist()
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    if len(set(ours.timesteps.tolist())) < len(ours.timesteps):  # rounded σ schedules can repeat a timestep
        ours.set_begin_index(0)  # (the pipeline always does); diffusers would start at the second repeat
        ref.set_begin_index(0)

    base = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x = randn_tensor(shape, generator=generators([1, 2])) * float(ref.init_noise_sigma)
    x_ours, x_ref = x.clone(), x.clone()
    g_ours, g_ref = generators([10, 11]), generators([10, 11])
    worst = 0.0
    for t_ours, t_ref in zip(ours.timesteps, ref.timesteps):
        scale = max(1.0, x_ref.abs().max().item())
        in_ours, in_ref = ours.scale_model_input(x_ours, t_ours), ref.scale_model_input(x_ref, t_ref)
        torch.testing.assert_close(in_ours, in_ref, atol=TOL * scale, rtol=TOL)
        model_output = fake_model(in_ref, t_ref, base)  # the same output fed to both
        x_ours = ours.step(model_output, t_ours, x_ours, generator=g_ours)
        x_ref = ref.step(model_output, t_ref, x_ref, generator=g_ref).prev_sample
        torch.testing.assert_close(x_ours, x_ref, atol=TOL * scale, rtol=TOL)
        worst = max(worst, (x_ours - x_ref).abs().max().item() / max(1.0, x_ref.abs().max().item()))
    return worst


CASES = [(name, scheduler) for name in SAMPLERS for scheduler in SAMPLERS[name].schedulers]


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name,scheduler", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_every_schedule_matches_diffusers(name, scheduler, config_name):
    run_both(name, CONFIGS[config_name], scheduler)


@pytest.mark.parametrize("name,scheduler", [("euler", "karras"), ("dpmpp_2m", "karras"), ("euler_ancestral", "exponential"), ("ddim", "ddim_uniform")])
def test_v_prediction_schedules_match_diffusers(name, scheduler):
    run_both(name, ScheduleConfig(prediction_type="v_prediction"), scheduler)


def test_model_default_karras_matches_diffusers_and_callers_override_it():
    """A config with use_karras_sigmas samples with karras (diffusers' image), unless the caller names another."""
    cfg = {**ScheduleConfig().to_diffusers(), "use_karras_sigmas": True}
    config = ScheduleConfig.from_diffusers(cfg)
    assert config.default_scheduler == "karras" and config.to_diffusers() == cfg
    for name in ("euler", "dpmpp_2m", "euler_ancestral"):
        sampler = get_sampler(name, config)
        assert sampler.scheduler == "karras"
        sampler.set_timesteps(STEPS)
        assert sampler.timesteps.tolist() == pytest.approx(oracle(name, config, "karras", sampler).timesteps.tolist(), abs=2e-3)
    karras, normal = (get_sampler("euler", config, scheduler=s) for s in ("karras", "normal"))
    for s in (karras, normal):
        s.set_timesteps(STEPS)
    assert not torch.allclose(karras.sigmas, normal.sigmas, rtol=0.05)  # what dropping the flag used to cost
    # DDIM and DDPM cannot run karras: they fall back to normal, as diffusers' DDIM/DDPM ignore the flag
    assert get_sampler("ddim", config).scheduler == "normal" and get_sampler("ddpm", config).scheduler == "normal"
    assert ScheduleConfig.from_diffusers({**cfg, "use_karras_sigmas": False, "use_exponential_sigmas": True}).default_scheduler == "exponential"


def test_unsupported_combinations_are_refused_in_one_sentence():
    with pytest.raises(ValueError, match=r"^sampler 'ddim' does not support the 'karras' scheduler; it supports: normal, simple, ddim_uniform$"):
        get_sampler("ddim", ScheduleConfig(), scheduler="karras")
    with pytest.raises(ValueError, match=r"^sampler 'ddpm' does not support the 'sgm_uniform' scheduler"):
        get_sampler("ddpm", ScheduleConfig(), scheduler="sgm_uniform")
    with pytest.raises(ValueError, match=r"^unknown scheduler 'beta'; expected one of: normal, karras, exponential, sgm_uniform, simple, ddim_uniform$"):
        get_sampler("euler", ScheduleConfig(), scheduler="beta")
    assert check_scheduler("euler", None) == "normal" and check_scheduler("ddim", "simple") == "simple"
    assert SCHEDULERS == ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform")
    for name, spec in SAMPLERS.items():
        assert set(spec.schedulers) <= set(SCHEDULERS) and spec.schedulers[0] == "normal"
        assert set(spec.schedulers) == (set(SCHEDULERS) if name in ("dpmpp_2m", "euler", "euler_ancestral") else {"normal", "simple", "ddim_uniform"})


# --- The schedules themselves against k-diffusion and ComfyUI ----------------------------------------------------


def k_get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, dtype=torch.float32):  # k_diffusion/sampling.py, get_sigmas_karras
    ramp = torch.linspace(0, 1, n, dtype=dtype)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def k_get_sigmas_exponential(n, sigma_min, sigma_max, dtype=torch.float32):  # k_diffusion/sampling.py, get_sigmas_exponential
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=dtype).exp()
    return torch.cat([sigmas, sigmas.new_zeros([1])])


class ComfyModelSampling:
    """comfy/model_sampling.py ModelSamplingDiscrete: σ table, nearest timestep of a σ, log-linear σ of a t."""

    def __init__(self, alphas_cumprod):
        self.sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()
        self.log_sigmas = self.sigmas.log()
        self.sigma_min, self.sigma_max = self.sigmas[0], self.sigmas[-1]

    def timestep(self, sigma):
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep):
        t = torch.clamp(timestep.float(), min=0, max=(len(self.sigmas) - 1))
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp()


def comfy_simple(s, steps):  # comfy/samplers.py, simple_scheduler
    sigs = []
    ss = len(s.sigmas) / steps
    for x in range(steps):
        sigs += [float(s.sigmas[-(1 + int(x * ss))])]
    sigs += [0.0]
    return torch.FloatTensor(sigs)


def comfy_ddim_uniform(s, steps):  # comfy/samplers.py, ddim_scheduler
    x = 1
    if math.isclose(float(s.sigmas[x]), 0, abs_tol=0.00001):
        steps += 1
        sigs = []
    else:
        sigs = [0.0]
    ss = max(len(s.sigmas) // steps, 1)
    while x < len(s.sigmas):
        sigs += [float(s.sigmas[x])]
        x += ss
    sigs = sigs[::-1]
    return torch.FloatTensor(sigs)


def comfy_sgm_uniform(s, steps):  # comfy/samplers.py, normal_scheduler(..., sgm=True)
    start = s.timestep(s.sigma_max)
    end = s.timestep(s.sigma_min)
    timesteps = torch.linspace(start, end, steps + 1)[:-1]
    sigs = [float(s.sigma(ts)) for ts in timesteps]
    sigs += [0.0]
    return torch.FloatTensor(sigs)


COMFY = {"simple": comfy_simple, "ddim_uniform": comfy_ddim_uniform, "sgm_uniform": comfy_sgm_uniform}


@pytest.mark.parametrize("config_name", ["sd", "linear-trailing", "cosine-leading"])
@pytest.mark.parametrize("n", [1, 7, 10, 25, 999])
def test_schedules_match_k_diffusion_and_comfyui(config_name, n):
    config = CONFIGS[config_name]
    table = schedules.sigma_table(schedules.alphas_cumprod(config)).double()
    lo, hi = table[0].item(), table[-1].item()
    # the pure functions: k-diffusion's formulas in float64 (ours, as diffusers) and in its own float32, whose
    # rounding ρ = 7 amplifies sevenfold
    for ours, reference in ((schedules.karras_sigmas, k_get_sigmas_karras), (schedules.exponential_sigmas, k_get_sigmas_exponential)):
        torch.testing.assert_close(ours(n, lo, hi), reference(n, lo, hi, dtype=torch.float64), rtol=1e-12, atol=0)
        torch.testing.assert_close(ours(n, lo, hi).float(), reference(n, lo, hi), rtol=1e-5, atol=0)
    # DPM-Solver's karras/exponential span k-diffusion's (and ComfyUI's) range, the model's σ_0 … σ_{T−1}
    for scheduler, reference in (("karras", k_get_sigmas_karras), ("exponential", k_get_sigmas_exponential)):
        plan = schedules.plan(config, n, scheduler, "dpm")
        torch.testing.assert_close(plan.sigmas, reference(n, lo, hi, dtype=torch.float64).float(), rtol=1e-6, atol=0)
    comfy = ComfyModelSampling(schedules.alphas_cumprod(config).double())
    for scheduler, reference in COMFY.items():
        want = reference(comfy, n)
        for family in ("euler", "dpm", "discrete"):
            if scheduler not in schedules.supported(family):
                continue
            plan = schedules.plan(config, n, scheduler, family)
            torch.testing.assert_close(plan.sigmas, want, rtol=1e-5, atol=0)  # ComfyUI interpolates in float32
            if scheduler != "sgm_uniform":  # on training steps: t is exactly that step
                assert torch.equal(schedules.sigma_table(schedules.alphas_cumprod(config))[plan.timesteps], plan.sigmas[:-1])


def test_comfyui_step_counts():
    """ddim_uniform keeps ComfyUI's own count (one more step when ⌊T/n⌋ does not reach T−1 evenly)."""
    config = ScheduleConfig()
    counts = {n: len(schedules.plan(config, n, "ddim_uniform").timesteps) for n in (1, 3, 7, 10, 20, 600)}
    assert counts == {1: 1, 3: 3, 7: 8, 10: 10, 20: 20, 600: 999}
    assert schedules.plan(config, 10, "ddim_uniform").timesteps.tolist() == schedules.timesteps(config, 10).tolist()  # = leading, offset 1
    assert schedules.plan(config, 7, "simple").timesteps.tolist() == [999, 857, 714, 571, 428, 285, 142]
    assert schedules.plan(config, 4, "sgm_uniform", "euler").timesteps.tolist() == [999.0, 749.25, 499.5, 249.75]
    dpm = schedules.plan(config, 4, "sgm_uniform", "dpm").timesteps  # rounded half to even, int64 as DPM-Solver's
    assert dpm.dtype == torch.int64 and dpm.tolist() == [999, 749, 500, 250]


def test_sigma_timestep_conversions_match_their_references_beyond_the_table_too():
    """sigma_to_t is diffusers' _sigma_to_t (t clipped to 0 … T−1), linear_sigma numpy's interp, log_linear_sigma
    ComfyUI's ModelSamplingDiscrete.sigma (t clamped) — at, between and past the ends of the table."""
    config = ScheduleConfig()
    table = schedules.sigma_table(schedules.alphas_cumprod(config))
    lo, hi = table[0].item(), table[-1].item()
    sigma = torch.tensor([lo / 2, lo, (lo + table[1].item()) / 2, table[500].item() * 1.01, hi * 0.9999, hi, 2 * hi], dtype=torch.float64)
    ref = EulerDiscreteScheduler.from_config(config.to_diffusers())
    # The same log σ table for both: np.log and torch.log of float32 differ by an ulp on some CPUs (1e-5 in t).
    want = torch.from_numpy(ref._sigma_to_t(sigma.numpy(), table.log().numpy()))
    torch.testing.assert_close(schedules.sigma_to_t(sigma, table), want, atol=1e-9, rtol=0)
    assert want[0] == 0 and want[-1] == 999
    t = torch.tensor([0, 0.5, 1, 500.25, 998.5, 999], dtype=torch.float64)
    want = torch.from_numpy(np.interp(t.numpy(), np.arange(1000), table.double().numpy()))
    torch.testing.assert_close(schedules.linear_sigma(t, table), want, atol=0, rtol=1e-12)
    t = torch.tensor([-3, 0, 0.5, 500.25, 999, 1000.5, 1200])
    torch.testing.assert_close(schedules.log_linear_sigma(t, table).float(), ComfyModelSampling(schedules.alphas_cumprod(config)).sigma(t),
                               atol=0, rtol=1e-6)


# --- Whole loops against k-diffusion's samplers ---------------------------------------------------------------------


def k_sample_euler(model, x, sigmas):  # k_diffusion/sampling.py, sample_euler (s_churn = 0)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma_hat = sigmas[i]
        denoised = model(x, sigma_hat * s_in)
        d = (x - denoised) / sigma_hat
        dt = sigmas[i + 1] - sigma_hat
        x = x + d * dt
    return x


def k_sample_dpmpp_2m(model, x, sigmas):  # k_diffusion/sampling.py, sample_dpmpp_2m
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@pytest.mark.parametrize("scheduler", ["normal", "karras", "exponential", "sgm_uniform", "simple"])
@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_loops_match_k_diffusion(name, scheduler):
    """Our σ (and the timestep the UNet sees) fed to k-diffusion's sampler with the eps → denoised wrapper of
    k_diffusion/external.py (DiscreteEpsDDPMDenoiser): the final latents agree within 3.5e-5."""
    config = ScheduleConfig()
    ours = get_sampler(name, config, scheduler=scheduler)
    ours.set_timesteps(20)
    shape = (2, 4, 8, 8)
    base = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    sigmas = ours.sigmas.double()
    step = iter(ours.timesteps.tolist())

    def denoiser(x, sigma):  # c_in = 1/√(σ² + 1), c_out = −σ; the UNet sees our timestep of this step
        return (x - sigma[0] * fake_model((x / (sigma[0] ** 2 + 1) ** 0.5).float(), next(step), base).double()).float()

    if name == "euler":  # σ-space x = x_0 + σ ε, started at x = ε·init_noise_sigma
        theirs = k_sample_euler(denoiser, noise * ours.init_noise_sigma, ours.sigmas)
        x = noise * ours.init_noise_sigma
    else:  # DPM-Solver's x is variance preserving: x_vp = x_σ/√(σ² + 1), and at σ = 0 they coincide
        theirs = k_sample_dpmpp_2m(denoiser, noise * (sigmas[0] ** 2 + 1).sqrt().float(), ours.sigmas)
        x = noise.clone()
    for t in ours.timesteps:
        x = ours.step(fake_model(ours.scale_model_input(x, t), t, base), t, x)
    assert (x - theirs).abs().max().item() <= 3.5e-5


# --- Config handling ----------------------------------------------------------------------------------------------


def test_linspace_spacing_loads_and_matches_diffusers_timesteps():
    config = ScheduleConfig.from_diffusers({**ScheduleConfig().to_diffusers(), "timestep_spacing": "linspace"})
    assert config.timestep_spacing == "linspace"
    for n in (1, 2, 7, 25, 61):
        for name in SAMPLERS:
            ours = get_sampler(name, config)
            ours.set_timesteps(n)
            ref = oracle(name, config, "normal", ours) if n == STEPS else None
            if ref is None:
                cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler,
                       "euler": EulerDiscreteScheduler, "euler_ancestral": EulerAncestralDiscreteScheduler}[name]
                ref = cls.from_config(config.to_diffusers())
                ref.set_timesteps(n)
            assert ours.timesteps.dtype == (torch.float32 if name.startswith("euler") else torch.int64)
            assert ours.timesteps.tolist() == ref.timesteps.tolist(), (name, n)
    assert get_sampler("dpmpp_2m", config).max_steps == 999 and get_sampler("ddim", config).max_steps == 1000


def test_unhonoured_keys_are_named_in_one_warning(caplog):
    sd = {  # SDXL's scheduler_config.json: every key either honoured or neutral
        "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
        "use_karras_sigmas": False,
    }
    with caplog.at_level(logging.WARNING, logger="latentdiff"):
        assert ScheduleConfig.from_diffusers(sd) == ScheduleConfig()
    assert caplog.records == []
    odd = {**sd, "use_beta_sigmas": True, "thresholding": True, "final_sigmas_type": "sigma_min", "timestep_type": "continuous",
           "interpolation_type": "log_linear", "sigma_min": 0.1, "use_lu_lambdas": True, "solver_order": 3}
    with caplog.at_level(logging.WARNING, logger="latentdiff"):
        assert ScheduleConfig.from_diffusers(odd) == ScheduleConfig()
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    head, tail = "scheduler config: latentdiff does not honour ", "; sampling may differ from diffusers' with this config."
    assert message.startswith(head) and message.endswith(tail)
    assert set(message[len(head):-len(tail)].split(", ")) == {
        "use_beta_sigmas=True", "thresholding=True", "final_sigmas_type='sigma_min'", "timestep_type='continuous'",
        "interpolation_type='log_linear'", "sigma_min=0.1", "use_lu_lambdas=True", "solver_order=3"}
    with pytest.raises(ValueError, match=r"^scheduler config sets both use_karras_sigmas and use_exponential_sigmas; expected at most one\.$"):
        ScheduleConfig.from_diffusers({**sd, "use_karras_sigmas": True, "use_exponential_sigmas": True})


def test_config_round_trip_and_trained_betas():
    zero = CONFIGS["zero-snr"]
    assert ScheduleConfig.from_diffusers(zero.to_diffusers()) == zero
    assert "rescale_betas_zero_snr" not in ScheduleConfig().to_diffusers()  # unchanged keys for every existing model
    assert set(ScheduleConfig().to_diffusers()) == {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                                   "prediction_type", "timestep_spacing", "steps_offset"}
    ref = DDPMScheduler.from_config(zero.to_diffusers())
    torch.testing.assert_close(schedules.alphas_cumprod(zero), ref.alphas_cumprod, atol=0, rtol=0)
    assert schedules.alphas_cumprod(zero)[-1] == 0 and schedules.alphas_cumprod(zero, sigma_space=True)[-1] == 2**-24
    betas = torch.linspace(1e-4, 0.02, 1000).tolist()
    trained = ScheduleConfig.from_diffusers({**ScheduleConfig().to_diffusers(), "trained_betas": betas})
    assert ScheduleConfig.from_diffusers(trained.to_diffusers()) == trained
    ref = DDPMScheduler.from_config(trained.to_diffusers())
    torch.testing.assert_close(schedules.alphas_cumprod(trained), ref.alphas_cumprod, atol=0, rtol=0)
    with pytest.raises(ValueError, match="trained_betas must hold num_train_timesteps"):
        ScheduleConfig(trained_betas=(0.1,) * 10)
    with pytest.raises(ValueError, match="default_scheduler 'simple' is not supported"):
        ScheduleConfig(default_scheduler="simple")


@pytest.mark.parametrize("name,scheduler", [("euler", "karras"), ("euler_ancestral", "sgm_uniform"), ("dpmpp_2m", "karras"),
                                            ("dpmpp_2m", "exponential"), ("ddpm", "simple"), ("euler", "normal")])
def test_add_noise_uses_the_schedules_sigma(name, scheduler):
    """img2img noises to the schedule's σ at one of its timesteps (diffusers' add_noise), training σ_t elsewhere."""
    config = ScheduleConfig()
    ours = get_sampler(name, config, scheduler=scheduler)
    ours.set_timesteps(STEPS)
    ref = oracle(name, config, scheduler, ours)
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn((2, 4, 8, 8), generator=gen), torch.randn((2, 4, 8, 8), generator=gen)
    t = ref.timesteps[[0, 3]]
    torch.testing.assert_close(ours.add_noise(x0, noise, ours.timesteps[[0, 3]]), ref.add_noise(x0, noise, t), atol=1e-5, rtol=1e-5)


def test_duplicate_rounded_timesteps_take_the_second_as_diffusers():
    ours = get_sampler("dpmpp_2m", ScheduleConfig(), scheduler="karras")
    ours.set_timesteps(200)
    ts = ours.timesteps.tolist()
    repeated = next(t for t in ts if ts.count(t) > 1)
    ref = DPMSolverMultistepScheduler.from_config({**ScheduleConfig().to_diffusers(), **DPM, "use_karras_sigmas": True})
    ref.set_timesteps(200)
    assert ref.timesteps.tolist() == ts
    assert ours._index(torch.tensor(repeated)) == ref.index_for_timestep(torch.tensor(repeated))
    # add_noise too: at a timestep repeated twice (7, 5) or more (4, 3, 2, 1, 0) the second one's σ, as diffusers'
    repeats = torch.tensor(sorted({t for t in ts if ts.count(t) > 1}))
    assert {ts.count(t) for t in repeats.tolist()} >= {2, 3}
    x0, noise = torch.zeros(len(repeats), 1), torch.ones(len(repeats), 1)
    torch.testing.assert_close(ours.add_noise(x0, noise, repeats), ref.add_noise(x0, noise, repeats), atol=0, rtol=1e-6)


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_add_noise_off_the_schedule_uses_the_training_sigma(name):
    """A t that is not one of the run's timesteps (any t before set_timesteps) noises to the training σ_t: that of
    diffusers' EulerDiscreteScheduler before set_timesteps at integer t, linear in σ between them (np.interp)."""
    config = ScheduleConfig()
    ref = EulerDiscreteScheduler.from_config(config.to_diffusers())  # before set_timesteps: all T training steps
    t_int, t_frac = torch.tensor([0, 2, 500, 998, 999]), torch.tensor([0.5, 500.25, 998.5])
    want = torch.cat([ref.add_noise(torch.zeros(5, 1), torch.ones(5, 1), t_int)[:, 0],
                      torch.from_numpy(np.interp(t_frac.numpy(), np.arange(1000), ref.sigmas.flip(0)[1:].numpy())).float()])
    if name == "dpmpp_2m":  # variance preserving: x_t = α x_0 + α σ ε, α = 1/√(σ² + 1)
        want = want / (want.double() ** 2 + 1).sqrt().float()
    sampler = get_sampler(name, config)
    for scheduled in (False, True):
        if scheduled:
            sampler.set_timesteps(STEPS)
            assert not set(sampler.timesteps.tolist()) & set(t_int.tolist() + t_frac.tolist())
        got = torch.cat([sampler.add_noise(torch.zeros(len(t), 1), torch.ones(len(t), 1), t)[:, 0] for t in (t_int, t_frac)])
        torch.testing.assert_close(got, want, atol=0, rtol=1e-6)


@pytest.mark.parametrize("name,scheduler,config_name", [("euler", "karras", "sd"), ("dpmpp_2m", "exponential", "sd"),
                                                        ("euler_ancestral", "normal", "zero-snr"), ("ddim", "simple", "zero-snr"),
                                                        ("ddim", "normal", "zero-snr"), ("ddpm", "ddim_uniform", "sd"),
                                                        ("ddpm", "normal", "zero-snr")])
def test_sigma_list_is_each_steps_noise_level_then_zero(name, scheduler, config_name):
    """What the pipeline's guidance_min_sigma reads, as host floats: diffusers' σ schedule for the σ-space samplers,
    σ_t = √((1 − ᾱ_t)/ᾱ_t) of diffusers' own ᾱ for DDIM/DDPM (∞ at ᾱ_T = 0: zero SNR keeps ᾱ_T = 0 there)."""
    config = CONFIGS[config_name]
    ours = get_sampler(name, config, scheduler=scheduler)
    ours.set_timesteps(STEPS)
    ref = oracle(name, config, scheduler, ours)
    if name in ("ddim", "ddpm"):
        a = ref.alphas_cumprod[ours.timesteps].double()
        want = torch.cat([((1 - a) / a).sqrt(), a.new_zeros(1)])
    else:
        want = ref.sigmas.double()
    assert isinstance(ours.sigma_list, list) and len(ours.sigma_list) == len(ours.timesteps) + 1
    torch.testing.assert_close(torch.tensor(ours.sigma_list, dtype=torch.float64), want, atol=0, rtol=1e-6)


SYNCING = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy")  # tests/test_device_policy.py


@pytest.mark.parametrize("name,scheduler", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_loop_and_add_noise_read_nothing_back(name, scheduler, monkeypatch):
    """With float timesteps too, scale_model_input/step/add_noise never read a tensor back to the host."""
    sampler = get_sampler(name, ScheduleConfig(), scheduler=scheduler)
    sampler.set_timesteps(5)
    sampler.set_begin_index(1)
    gen = torch.Generator().manual_seed(0)
    x0, noise, base = (torch.randn((2, 4, 8, 8), generator=gen) for _ in range(3))
    gens = generators([1, 2])
    timesteps = sampler.timesteps[1:]

    def refuse(method):
        def sync(self, *args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{method}")
        return sync

    for method in SYNCING:
        monkeypatch.setattr(torch.Tensor, method, refuse(method))
    x = sampler.add_noise(x0, noise, timesteps[:1].expand(2))
    for t in timesteps:
        x = sampler.step(0.3 * sampler.scale_model_input(x, t) + 0.7 * torch.cos(t / 150) * base, t, x, generator=gens)
    monkeypatch.undo()
    assert torch.isfinite(x).all()


def test_shipped_and_saved_configs_load_silently(caplog):
    import latentdiff

    files = sorted(Path(latentdiff.__file__).parent.glob("**/scheduler_config.json"))
    assert files
    with caplog.at_level(logging.WARNING, logger="latentdiff"):
        for file in files:
            ScheduleConfig.from_diffusers(json.loads(file.read_text()))
        saved = {"_class_name": "DDIMScheduler", **ScheduleConfig().to_diffusers(), "clip_sample": False, "set_alpha_to_one": False}
        ScheduleConfig.from_diffusers(saved)  # what LatentDiffusionPipeline.save_pretrained writes
    assert caplog.records == []
