"""Samplers and schedules against diffusers' schedulers as the oracle.

Tolerance: every intermediate sample must agree elementwise within rtol = 1e-5 and atol = 1e-5 · max(1, max|x_t|)
(float32; x_t is the step's input, which starts at |x| ≈ 60 for the σ-space Euler samplers).
"""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

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

from latentdiff.schedulers import SAMPLERS, ScheduleConfig, from_a1111, get_sampler, schedules
from latentdiff.schedulers.base import randn

SHAPE = (2, 4, 8, 8)
STEPS = 10
TOL = 1e-5

# The diffusers settings each of our samplers reproduces, on top of ScheduleConfig.to_diffusers().
ORACLES = {
    "ddpm": (DDPMScheduler, {"clip_sample": False, "variance_type": "fixed_small"}),
    "ddim": (DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False}),
    "dpmpp_2m": (
        DPMSolverMultistepScheduler,
        {
            "algorithm_type": "dpmsolver++",
            "solver_order": 2,
            "solver_type": "midpoint",
            "lower_order_final": True,
            "final_sigmas_type": "zero",
            "use_karras_sigmas": False,
        },
    ),
    "euler": (EulerDiscreteScheduler, {"interpolation_type": "linear", "use_karras_sigmas": False}),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}),
}

CONFIGS = {
    "sd": ScheduleConfig(),  # scaled_linear, leading, offset 1
    "linear-trailing": ScheduleConfig(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", timestep_spacing="trailing", steps_offset=0),
    "cosine-leading": ScheduleConfig(beta_schedule="squaredcos_cap_v2"),
}

CASES = [("ddpm", {}), ("ddim", {}), ("ddim", {"eta": 0.5}), ("ddim", {"eta": 1.0}), ("dpmpp_2m", {}), ("euler", {}),
         ("euler_ancestral", {})]  # DDIM's eta: 1, its upper bound, is DDPM's posterior variance (Song et al. 2021 eq. 16)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers


def oracle(name: str, config: ScheduleConfig):
    cls, extra = ORACLES[name]
    return cls.from_config({**config.to_diffusers(), **extra})


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def fake_model(x: torch.Tensor, t, base: torch.Tensor) -> torch.Tensor:
    """A noise-free stand-in for the UNet: a smooth function of (x, t)."""
    return 0.3 * x + 0.7 * math.cos(float(t) / 150) * base


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name,kwargs", CASES, ids=lambda c: str(c) if isinstance(c, str) else "-".join(f"{k}{v}" for k, v in c.items()))
def test_sampling_loop_matches_diffusers(name, kwargs, prediction_type, config_name):
    config = ScheduleConfig(**{**CONFIGS[config_name].to_diffusers(), "prediction_type": prediction_type})
    ours, ref = get_sampler(name, config, **kwargs), oracle(name, config)
    ours.set_timesteps(STEPS)
    ref.set_timesteps(STEPS)
    assert ours.timesteps.dtype == torch.int64
    assert ours.timesteps.tolist() == ref.timesteps.long().tolist()
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)

    base = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    x = randn_tensor(SHAPE, generator=generators([1, 2])) * float(ref.init_noise_sigma)
    x_ours, x_ref = x.clone(), x.clone()
    g_ours, g_ref = generators([10, 11]), generators([10, 11])
    ref_kwargs = {"eta": kwargs["eta"]} if "eta" in kwargs else {}
    for t_ours, t_ref in zip(ours.timesteps, ref.timesteps):
        scale = max(1.0, x_ref.abs().max().item())
        in_ours, in_ref = ours.scale_model_input(x_ours, t_ours), ref.scale_model_input(x_ref, t_ref)
        torch.testing.assert_close(in_ours, in_ref, atol=TOL * scale, rtol=TOL)
        model_output = fake_model(in_ref, t_ref, base)  # the same output fed to both
        x_ours = ours.step(model_output, t_ours, x_ours, generator=g_ours)
        x_ref = ref.step(model_output, t_ref, x_ref, generator=g_ref, **ref_kwargs).prev_sample
        torch.testing.assert_close(x_ours, x_ref, atol=TOL * scale, rtol=TOL)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 25, 61])
def test_timesteps_match_diffusers(spacing, steps):
    config = ScheduleConfig(timestep_spacing=spacing)
    for name in SAMPLERS:
        ours, ref = get_sampler(name, config), oracle(name, config)
        ours.set_timesteps(steps)
        ref.set_timesteps(steps)
        # np.arange(T, 0, -T/61) yields 62 values ending in t = -1 in diffusers; we keep exactly `steps`.
        assert ours.timesteps.tolist() == ref.timesteps.long().tolist()[:steps], name
        assert len(ours.timesteps) == steps


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_add_noise_and_velocity_match_diffusers(config_name):
    config = CONFIGS[config_name]
    ref = DDPMScheduler.from_config(config.to_diffusers())
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    t = torch.tensor([0, config.num_train_timesteps - 1])
    ac = schedules.alphas_cumprod(config)
    torch.testing.assert_close(ac, ref.alphas_cumprod, atol=0, rtol=0)
    torch.testing.assert_close(schedules.add_noise(x0, noise, t, ac), ref.add_noise(x0, noise, t), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(schedules.get_velocity(x0, noise, t, ac), ref.get_velocity(x0, noise, t), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(schedules.snr(t, ac), ac[t] / (1 - ac[t]))


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_add_noise_matches_diffusers(name, config_name):
    """Each sampler noises in its own parameterisation: VP for DDPM/DDIM/DPM++, x_0 + σ ε for the Euler family."""
    config = CONFIGS[config_name]
    ours, ref = get_sampler(name, config), oracle(name, config)
    ours.set_timesteps(STEPS)
    ref.set_timesteps(STEPS)
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    t = ours.timesteps[[0, STEPS // 2]]
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-5, rtol=1e-5)
    assert ours.add_noise(x0.bfloat16(), noise.bfloat16(), t).dtype == torch.bfloat16


def test_get_sampler_options():
    assert get_sampler("ddim", ScheduleConfig(), eta=0.5).eta == 0.5
    assert isinstance(get_sampler("euler", ScheduleConfig(), eta=0.0), SAMPLERS["euler"].cls)  # neutral value: ignored
    with pytest.raises(ValueError, match="sampler 'euler' takes no eta"):
        get_sampler("euler", ScheduleConfig(), eta=0.5)
    assert from_a1111("Euler a") == "euler_ancestral" and from_a1111("DPM++ 2M") == "dpmpp_2m"
    assert from_a1111("dpmpp_2m") == "dpmpp_2m"


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_ddim_eta_outside_zero_one_is_refused(eta):
    # above 1, 1 − ᾱ_{t'} − σ_t² turns negative and the update is NaN
    with pytest.raises(ValueError, match=rf"^eta must be between 0 \(deterministic\) and 1 \(DDPM-like\), got {eta}\.$"):
        get_sampler("ddim", ScheduleConfig(), eta=eta)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_a_sampler_built_without_a_schedule_runs_diffusers_own(name):
    """The classes default to the "normal" schedule (the timesteps of the config's spacing), as get_sampler does."""
    bare, ref = SAMPLERS[name].cls(ScheduleConfig()), oracle(name, ScheduleConfig())
    bare.set_timesteps(STEPS)
    ref.set_timesteps(STEPS)
    assert bare.scheduler == "normal" and bare.timesteps.tolist() == ref.timesteps.long().tolist()


def test_randn_matches_diffusers_and_is_per_element():
    shape = (3, 4, 8, 8)
    torch.testing.assert_close(randn(shape, generators([1, 2, 3])), randn_tensor(shape, generator=generators([1, 2, 3])), atol=0, rtol=0)
    torch.testing.assert_close(randn(shape, torch.Generator().manual_seed(5)), randn_tensor(shape, generator=torch.Generator().manual_seed(5)), atol=0, rtol=0)
    alone = randn((1, 4, 8, 8), generators([2]))
    torch.testing.assert_close(randn(shape, generators([1, 2, 3]))[1:2], alone, atol=0, rtol=0)
    with pytest.raises(ValueError, match="one per batch element"):
        randn(shape, generators([1, 2]))


@pytest.mark.parametrize("name", ["ddpm", "euler_ancestral"])
def test_stochastic_sample_does_not_depend_on_batch_position(name):
    def sample(seeds):
        sampler = get_sampler(name, ScheduleConfig())
        sampler.set_timesteps(5)
        gens = generators(seeds)
        x = randn((len(seeds), 4, 8, 8), gens) * sampler.init_noise_sigma
        for t in sampler.timesteps:
            x = sampler.step(0.5 * sampler.scale_model_input(x, t), t, x, generator=gens)
        return x

    torch.testing.assert_close(sample([5, 6, 7])[1:2], sample([6]), atol=0, rtol=0)


def test_set_timesteps_resets_multistep_state_and_step_keeps_dtype():
    sampler = get_sampler("dpmpp_2m", ScheduleConfig())
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))

    def run():
        sampler.set_timesteps(4)
        y = x.bfloat16()
        for t in sampler.timesteps:
            y = sampler.step(0.1 * y, t, y)
            assert y.dtype == torch.bfloat16
        return y

    torch.testing.assert_close(run(), run(), atol=0, rtol=0)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"^unknown sampler 'x'; expected one of: ddim, ddpm, dpmpp_2m, euler, euler_ancestral$"):
        get_sampler("x", ScheduleConfig())
    with pytest.raises(ValueError, match="num_inference_steps"):
        get_sampler("euler", ScheduleConfig()).set_timesteps(0)
    sampler = get_sampler("ddim", ScheduleConfig())
    sampler.set_timesteps(10)
    with pytest.raises(ValueError, match="not in this sampler's schedule"):
        sampler.step(torch.zeros(SHAPE), 500, torch.zeros(SHAPE))


def test_schedule_config_round_trip_and_validation():
    sd = {  # a Stable Diffusion 1.5 scheduler_config.json
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
        "clip_sample": False,
    }
    config = ScheduleConfig.from_diffusers(sd)
    assert config == ScheduleConfig()
    assert ScheduleConfig.from_diffusers(config.to_diffusers()) == config
    v = ScheduleConfig(prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=0)
    assert ScheduleConfig.from_diffusers(DDIMScheduler.from_config(v.to_diffusers()).config) == v
    with pytest.raises(ValueError, match="beta_schedule 'cosine' is not supported"):
        ScheduleConfig.from_diffusers({**sd, "beta_schedule": "cosine"})
    # zero terminal SNR is honoured now (sampling checked in tests/test_noise_schedules.py)
    assert ScheduleConfig.from_diffusers({**sd, "rescale_betas_zero_snr": True}).rescale_betas_zero_snr
