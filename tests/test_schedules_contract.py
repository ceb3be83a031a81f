"""The sampler contract beyond the step-by-step diffusers match of test_schedulers.py: config validation at its
boundaries, dtypes and devices (float32 tables whatever the default dtype; tensors follow the data's device, checked
on PyTorch's "meta" device), per-image noise drawn on the CPU, which steps draw noise at all, and error messages."""
import contextlib

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

from latentdiff.schedulers import (SAMPLERS, ScheduleConfig, check_sampler, from_a1111, from_a1111_combined, get_sampler,
                                   schedules)
from latentdiff.schedulers.base import randn

SHAPE = (2, 4, 8, 8)
META = torch.device("meta")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers  # tensors without data: device bookkeeping without a second real device


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("kwargs, message", [
    (dict(beta_schedule="cosine"), r"^beta_schedule 'cosine' is not supported; expected one of: linear, scaled_linear, squaredcos_cap_v2\.$"),
    (dict(prediction_type="sample"), r"^prediction_type 'sample' is not supported; expected one of: epsilon, v_prediction\.$"),
    (dict(timestep_spacing="uniform"), r"^timestep_spacing 'uniform' is not supported; expected one of: leading, trailing, linspace\.$"),
    (dict(num_train_timesteps=1), r"^num_train_timesteps must be an integer >= 2, got 1\.$"),
    (dict(num_train_timesteps=1000.0), r"^num_train_timesteps must be an integer >= 2, got 1000\.0\.$"),
    (dict(steps_offset=-1), r"^steps_offset must be a non-negative integer, got -1\.$"),
    (dict(steps_offset=1.0), r"^steps_offset must be a non-negative integer, got 1\.0\.$"),
    (dict(beta_start=0.0), r"^beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1, got 0\.0, 0\.012\.$"),
    (dict(beta_start=0.02, beta_end=0.01), "beta_start and beta_end must satisfy"),
    (dict(beta_end=1.0), r"got 0\.00085, 1\.0\.$"),
])
def test_schedule_config_refuses_out_of_range_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScheduleConfig(**kwargs)


def test_schedule_config_accepts_its_boundaries():
    ScheduleConfig(num_train_timesteps=2)
    ScheduleConfig(steps_offset=0)
    ScheduleConfig(beta_start=0.01, beta_end=0.01)  # a constant β schedule
    ScheduleConfig(beta_start=1e-9, beta_end=0.999)


# ------------------------------------------------------------------------------------------------ tables


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_beta_tables_are_float32_whatever_the_default_dtype(schedule):
    config = ScheduleConfig(beta_schedule=schedule)
    expected = schedules.betas(config)
    with default_dtype(torch.float64):
        betas = schedules.betas(config)
    assert betas.dtype == torch.float32 and torch.equal(betas, expected)
    assert expected.shape == (1000,)


def oracle_trailing(T: int, n: int) -> list[int]:
    # diffusers (DDIM/DDPM/Euler "trailing"): np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1, first n kept
    return (np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1)[:n].tolist()


def test_trailing_timesteps_match_diffusers_for_every_step_count():
    config = ScheduleConfig(timestep_spacing="trailing")
    for n in range(1, 1001):  # float32 rounding of the stride would differ for 50 of these (48, 96, 112, …)
        assert schedules.timesteps(config, n).tolist() == oracle_trailing(1000, n), n
    for n in (48, 96):
        ref = DDIMScheduler.from_config(config.to_diffusers())
        ref.set_timesteps(n)
        assert schedules.timesteps(config, n).tolist() == ref.timesteps.tolist()


def test_as_many_inference_steps_as_the_timesteps_allow():
    assert schedules.timesteps(ScheduleConfig(steps_offset=0), 1000).tolist() == list(range(999, -1, -1))
    assert schedules.timesteps(ScheduleConfig(timestep_spacing="trailing"), 1000).tolist() == list(range(999, -1, -1))
    with pytest.raises(ValueError, match=r"^num_inference_steps must be an integer between 1 and 1000 .*got 1001\.$"):
        schedules.timesteps(ScheduleConfig(steps_offset=0), 1001)
    sampler = get_sampler("ddim", ScheduleConfig(num_train_timesteps=10, steps_offset=0))
    sampler.set_timesteps(10)
    assert sampler.timesteps.tolist() == list(range(9, -1, -1))


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler", "euler_ancestral", "dpmpp_2m"])
def test_every_step_count_is_sampled_or_refused_in_one_sentence_with_sds_schedule(name):
    """SD's leading spacing with steps_offset 1: n = T steps would start at t = T, one past the ᾱ table."""
    sampler = get_sampler(name, ScheduleConfig())
    sampler.set_timesteps(sampler.max_steps)
    assert int(sampler.timesteps.max()) <= 999
    with pytest.raises(ValueError, match=rf"between 1 and {sampler.max_steps} .*got {sampler.max_steps + 1}\.$"):
        sampler.set_timesteps(sampler.max_steps + 1)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_sigmas_end_in_a_single_zero_like_diffusers(spacing):
    config = ScheduleConfig(timestep_spacing=spacing)
    ref = EulerDiscreteScheduler.from_config(config.to_diffusers())
    ref.set_timesteps(12)
    ours = schedules.sigmas(schedules.alphas_cumprod(config), ref.timesteps.long())
    assert ours.shape == (13,) and ours[-1] == 0 and ours[-2] > 0
    torch.testing.assert_close(ours, ref.sigmas.float(), atol=1e-5, rtol=1e-6)


def test_forward_process_and_snr_follow_the_datas_device():
    ac = schedules.alphas_cumprod(ScheduleConfig())
    x = torch.zeros(SHAPE, device=META)
    t = torch.tensor([0, 999], device=META)
    assert schedules.add_noise(x, x, t, ac).device == META
    assert schedules.get_velocity(x, x, t, ac).device == META
    assert schedules.snr(t, ac).device == META
    assert schedules.snr(torch.tensor([0, 999]), ac).device.type == "cpu"


# ------------------------------------------------------------------------------------------------ noise


@pytest.fixture
def randn_calls(monkeypatch):
    """The device each torch.randn call draws on."""
    calls, real = [], torch.randn

    def spy(*args, **kwargs):
        calls.append(torch.device(kwargs["device"]) if kwargs.get("device") is not None else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", spy)
    return calls


def test_cpu_generators_draw_on_the_cpu_and_the_noise_moves_to_the_device(randn_calls):
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    out = randn(SHAPE, gens, device=META)
    assert out.device == META and randn_calls == [torch.device("cpu")] * 2
    randn_calls.clear()
    out = randn(SHAPE, torch.Generator().manual_seed(1), device="meta")
    assert out.device == META and randn_calls == [torch.device("cpu")]
    randn_calls.clear()
    out = randn(SHAPE, None, device=META)  # no generator: drawn where it is used
    assert out.device == META and randn_calls == [META]
    randn_calls.clear()
    assert randn(SHAPE).device.type == "cpu" and randn_calls == [torch.device("cpu")]


def test_randn_draws_in_the_requested_dtype():
    for gens in ([torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)], torch.Generator().manual_seed(3)):
        out = randn((2, 5), gens, dtype=torch.float64)
        first = torch.randn((1, 5), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        assert out.dtype == torch.float64 and torch.equal(out[:1], first)  # float64 draws, not float32 ones cast


def test_randn_names_the_mismatch():
    with pytest.raises(ValueError, match=r"^got 2 generators for a batch of 3; expected one per batch element\.$"):
        randn((3, 4, 8, 8), [torch.Generator(), torch.Generator()])


def test_sampler_noise_is_float32_on_the_samples_device():
    sampler = get_sampler("ddpm", ScheduleConfig())
    with default_dtype(torch.float64):
        noise = sampler._noise(torch.zeros(2, 3, dtype=torch.bfloat16), torch.Generator().manual_seed(0))
    assert noise.dtype == torch.float32
    torch.testing.assert_close(noise, torch.randn((2, 3), generator=torch.Generator().manual_seed(0)), atol=0, rtol=0)
    assert sampler._noise(torch.zeros(2, 3, device=META), torch.Generator()).device == META


# ------------------------------------------------------------------------------------------------ samplers


def run(sampler, steps, generator, shape=(1, 4, 4, 4)):
    sampler.set_timesteps(steps)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(9)) * sampler.init_noise_sigma
    for t in sampler.timesteps:
        x = sampler.step(0.1 * sampler.scale_model_input(x, t), t, x, generator=generator)
    return x


def draws_left(generator, shape, n):
    """The state a generator has after n draws of `shape`."""
    g = torch.Generator().manual_seed(generator.initial_seed())
    for _ in range(n):
        torch.randn(shape, generator=g)
    return g.get_state()


@pytest.mark.parametrize("name, kwargs, draws", [
    ("ddim", {}, 0), ("dpmpp_2m", {}, 0), ("euler", {}, 0),  # deterministic: the generator is never touched
    ("ddim", {"eta": 0.5}, 5),  # σ_t > 0 on every step, the last one too (it lands on ᾱ_0, not 1)
    ("ddpm", {}, 4),  # every step but the last (t' = 0: x̂_0 itself)
    ("euler_ancestral", {}, 4),  # σ_up = 0 on the last step (σ_next = 0)
])
def test_only_steps_with_fresh_noise_draw_from_the_generator(name, kwargs, draws):
    g = torch.Generator().manual_seed(123)
    run(get_sampler(name, ScheduleConfig(), **kwargs), 5, g)
    assert torch.equal(g.get_state(), draws_left(g, (1, 4, 4, 4), draws))


def test_steps_are_counted_after_the_first_one():
    """t picks the start on the first step (img2img starts mid-schedule); later steps count, whatever t says."""
    ref, ours = get_sampler("ddim", ScheduleConfig()), get_sampler("ddim", ScheduleConfig())
    expected = run(ref, 6, None)
    ours.set_timesteps(6)
    x = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(9)) * ours.init_noise_sigma
    for t in ours.timesteps:
        x = ours.step(0.1 * x, ours.timesteps[0], x)
    torch.testing.assert_close(x, expected, atol=0, rtol=0)


def test_step_before_set_timesteps_is_an_error():
    for name in SAMPLERS:
        with pytest.raises(RuntimeError, match=r"^call set_timesteps\(\) before sampling\.$"):
            get_sampler(name, ScheduleConfig()).step(torch.zeros(SHAPE), 999, torch.zeros(SHAPE))


def test_timesteps_go_to_the_requested_device():
    sampler = get_sampler("euler", ScheduleConfig())
    sampler.set_timesteps(4, device=META)
    assert sampler.timesteps.device == META and sampler.timesteps.dtype == torch.int64


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("name, cls", [("euler", EulerDiscreteScheduler), ("euler_ancestral", EulerAncestralDiscreteScheduler)])
def test_euler_noise_level_is_defined_before_set_timesteps_as_in_diffusers(name, cls, spacing):
    config = ScheduleConfig(timestep_spacing=spacing)
    ours, ref = get_sampler(name, config), cls.from_config(config.to_diffusers())
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    torch.testing.assert_close(ours.sigmas, ref.sigmas.float(), atol=1e-5, rtol=1e-6)


def test_ddim_refuses_negative_eta():
    with pytest.raises(ValueError, match=r"^eta must be between 0 \(deterministic\) and 1 \(DDPM-like\), got -0\.1\.$"):
        get_sampler("ddim", ScheduleConfig(), eta=-0.1)


# ------------------------------------------------------------------------------------------------ registry


def test_options_a_sampler_does_not_take_are_named_in_the_error():
    with pytest.raises(ValueError, match=r"^sampler 'euler' takes no eta \(got 0\.5\); only no options$"):
        get_sampler("euler", ScheduleConfig(), eta=0.5)
    with pytest.raises(ValueError, match=r"^sampler 'ddim' takes no churn \(got 1\); only eta$"):
        get_sampler("ddim", ScheduleConfig(), churn=1)
    assert check_sampler("ddim") is SAMPLERS["ddim"]


def test_a1111_names_map_both_ways():
    for spec in SAMPLERS.values():
        assert from_a1111(spec.a1111) == spec.name
        assert from_a1111(spec.a1111.upper()) == spec.name  # A1111 display names are matched case-insensitively
        assert from_a1111(spec.name) == spec.name
    assert from_a1111("DPM++ 3M SDE") == "DPM++ 3M SDE"  # unknown names pass through for check_sampler to refuse
    assert from_a1111_combined("DPM++ 2M Karras") == ("dpmpp_2m", "karras")  # A1111 before 1.9: one name
    assert from_a1111_combined("k_euler_a") == ("euler_ancestral", None)  # its API's old names
    assert from_a1111_combined("Euler a") == ("euler_ancestral", None)
