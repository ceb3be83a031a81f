"""The sampler contract beyond the step-by-step diffusers match of test_schedulers.py: config validation at its
boundaries, dtypes and devices (float32 tables whatever the default dtype; tensors follow the data's device, checked
on PyTorch's "meta" device), per-image noise drawn on the CPU, which steps draw noise at all, and error messages."""
import contextlib
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

from latentdiff.schedulers import (SAMPLERS, ScheduleConfig, check_sampler, from_a1111, from_a1111_combined, get_sampler,
                                   schedule_from_a1111, schedules)
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
    (dict(rescale_betas_zero_snr=1), r"^rescale_betas_zero_snr must be true or false, got 1\.$"),
])
def test_schedule_config_refuses_out_of_range_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScheduleConfig(**kwargs)


def test_schedule_config_accepts_its_boundaries():
    ScheduleConfig(num_train_timesteps=2)
    ScheduleConfig(steps_offset=0)
    ScheduleConfig(beta_start=0.01, beta_end=0.01)  # a constant β schedule
    ScheduleConfig(beta_start=1e-9, beta_end=0.999)


def test_trained_betas_lie_in_zero_to_one_one_included():
    """β_T = 1 is what zero terminal SNR makes of the last step, so such a schedule can be given as trained_betas;
    β = 0 (no noise added) or β > 1 is no noise schedule."""
    zero = ScheduleConfig(rescale_betas_zero_snr=True)
    betas = schedules.betas(zero).tolist()
    assert betas[-1] == 1.0
    trained = ScheduleConfig(trained_betas=betas)
    torch.testing.assert_close(schedules.alphas_cumprod(trained), schedules.alphas_cumprod(zero), atol=0, rtol=0)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"^trained_betas must hold num_train_timesteps \(1000\) values in \(0, 1\], got 1000 values\.$"):
            ScheduleConfig(trained_betas=betas[:-1] + [bad])


# ------------------------------------------------------------------------------------------------ tables


@pytest.mark.parametrize("config", [ScheduleConfig(beta_schedule=s) for s in ("linear", "scaled_linear", "squaredcos_cap_v2")]
                         + [ScheduleConfig(trained_betas=np.linspace(1e-4, 0.02, 1000).tolist())],
                         ids=["linear", "scaled_linear", "squaredcos_cap_v2", "trained_betas"])
def test_beta_tables_are_float32_whatever_the_default_dtype(config):
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


def test_leading_spacing_allows_the_step_counts_whose_diffusers_timesteps_fit():
    """steps_offset lifts every leading timestep: the limit is the last step count before diffusers' timesteps leave
    0 … T−1 (checked for every offset of a 20-step table), 999 for SD's 1000 steps with offset 1."""
    T = 20
    for offset in range(T):
        config = ScheduleConfig(num_train_timesteps=T, steps_offset=offset)
        n = 0
        while n < T:
            ref = DDIMScheduler.from_config(config.to_diffusers())
            ref.set_timesteps(n + 1)
            if int(ref.timesteps.max()) > T - 1:
                break
            n += 1
        assert schedules.max_inference_steps(config) == n, offset
    assert schedules.max_inference_steps(ScheduleConfig()) == 999


@pytest.mark.parametrize("n", [True, 7.0])
def test_step_counts_must_be_integers(n):
    """True and 7.0 equal 1 and 7 but are no step count: refused in one sentence like 0."""
    got = re.escape(f"got {n!r}.")
    with pytest.raises(ValueError, match=rf"^num_inference_steps must be an integer between 1 and 999 for this schedule .*{got}$"):
        schedules.timesteps(ScheduleConfig(), n)
    with pytest.raises(ValueError, match=rf"^num_inference_steps must be an integer between 1 and 999 for this sampler and schedule .*{got}$"):
        schedules.plan(ScheduleConfig(), n)


def test_plan_defaults_to_the_normal_schedule_of_ddim_and_ddpm():
    config = ScheduleConfig()
    ref = DDIMScheduler.from_config(config.to_diffusers())
    ref.set_timesteps(10)
    assert schedules.plan(config, 10).timesteps.tolist() == ref.timesteps.tolist()
    assert schedules.max_steps(config) == 999  # the leading spacing's limit, not the 1000 of the other schedules


def test_plan_names_unknown_families_and_the_schedules_a_family_runs():
    with pytest.raises(ValueError, match=r"^unknown sampler family 'heun'; expected one of: discrete, euler, dpm\.$"):
        schedules.plan(ScheduleConfig(), 10, "normal", "heun")
    with pytest.raises(ValueError, match=r"^the 'karras' noise schedule does not apply to discrete samplers; expected one of: "
                                         r"normal, simple, ddim_uniform\.$"):
        schedules.plan(ScheduleConfig(), 10, "karras")


def test_img2img_starts_where_diffusers_get_timesteps_does():
    """int(steps · strength) steps run, the last ones (StableDiffusionImg2ImgPipeline.get_timesteps:
    t_start = steps − min(int(steps · strength), steps)); values worked by hand, float products truncated as there."""
    starts = {(1, 1): 0, (10, 1.0): 0, (10, 0.75): 3, (10, 0.5): 5, (10, 0.3): 7, (10, 0.1): 9, (25, 0.3): 18,
              (50, 0.999): 1, (100, 0.29): 72}  # 100 · 0.29 = 28.999… → 28 steps run
    assert {key: schedules.start_index(*key) for key in starts} == starts
    with pytest.raises(ValueError, match=r"^strength 0\.05 runs int\(10 × 0\.05\) = 0 of the 10 steps; raise strength or num_inference_steps$"):
        schedules.start_index(10, 0.05)  # diffusers would run no step at all


def test_strength_outside_zero_to_one_is_refused_in_one_sentence():
    for strength in (1, 1.0, 0.5, 1e-6):
        schedules.check_strength(strength)
    for strength in (0, 0.0, -0.5, 1.0001, 1.5, 2, True, "0.5", None):
        with pytest.raises(ValueError, match=r"^strength must be a number in \(0, 1\] \(the share of the steps that is run\), "
                                             rf"got {re.escape(repr(strength))}$"):
            schedules.check_strength(strength)


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


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2m"])
def test_sigma_space_add_noise_follows_the_datas_device(name):
    """σ-space samplers look σ up for t wherever t and the schedule live (here the CPU, t on either); the noised
    sample is on the data's device."""
    sampler = get_sampler(name, ScheduleConfig(), scheduler="karras")
    x = torch.zeros(SHAPE, device=META)
    assert sampler.add_noise(x, x, torch.tensor([0, 999])).device == META  # before set_timesteps: training σ
    sampler.set_timesteps(5)
    for t in (sampler.timesteps[[0, 2]], sampler.timesteps[[0, 2]].to(META), torch.tensor([0, 999], device=META)):
        assert sampler.add_noise(x, x, t).device == META


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


def test_begin_index_is_a_step_of_the_schedule_and_defaults_to_the_first():
    ref, ours = get_sampler("ddim", ScheduleConfig()), get_sampler("ddim", ScheduleConfig())
    with pytest.raises(RuntimeError, match=r"^call set_timesteps\(\) before sampling\.$"):
        ours.set_begin_index()
    expected = run(ref, 4, None)
    ours.set_timesteps(4)
    for index in (-1, 4):
        with pytest.raises(ValueError, match=rf"^begin index {index} is outside this sampler's 4 steps\.$"):
            ours.set_begin_index(index)
    ours.set_begin_index()
    x = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(9)) * ours.init_noise_sigma
    for _ in ours.timesteps:
        x = ours.step(0.1 * x, ours.timesteps[-1], x)  # t is not read: the count starts at step 0
    torch.testing.assert_close(x, expected, atol=0, rtol=0)


def test_the_first_step_finds_its_timestep_fractional_or_not():
    """img2img without set_begin_index: an unrounded start (Euler's sgm_uniform, t = 749.25) is found like an
    integer one, and a t outside the schedule is named as given."""
    ref, ours = (get_sampler("euler", ScheduleConfig(), scheduler="sgm_uniform") for _ in range(2))
    for sampler in (ref, ours):
        sampler.set_timesteps(4)
    ref.set_begin_index(1)
    assert ours.timesteps[1].item() == 749.25
    x_ref = x_ours = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(9))
    for t in ours.timesteps[1:]:
        x_ref, x_ours = ref.step(0.1 * x_ref, t, x_ref), ours.step(0.1 * x_ours, t, x_ours)
    torch.testing.assert_close(x_ours, x_ref, atol=0, rtol=0)
    ddim = get_sampler("ddim", ScheduleConfig())
    ddim.set_timesteps(4)
    with pytest.raises(ValueError, match=r"^timestep 500 is not in this sampler's schedule \[751, 501, 251, 1\]\.$"):
        ddim.step(torch.zeros(SHAPE), torch.tensor(500), torch.zeros(SHAPE))


def test_samplers_built_directly_run_the_normal_schedule_or_name_the_ones_they_run():
    for spec in SAMPLERS.values():
        assert spec.cls(ScheduleConfig()).scheduler == "normal"
    with pytest.raises(ValueError, match=r"^DDIMSampler does not run the 'karras' noise schedule; expected one of: "
                                         r"normal, simple, ddim_uniform\.$"):
        SAMPLERS["ddim"].cls(ScheduleConfig(), scheduler="karras")


def test_timesteps_go_to_the_requested_device():
    sampler = get_sampler("euler", ScheduleConfig())
    sampler.set_timesteps(4, device=META)
    assert sampler.timesteps.device == META and sampler.timesteps.dtype == torch.int64


@pytest.mark.parametrize("config", [ScheduleConfig(), ScheduleConfig(timestep_spacing="trailing"),
                                    ScheduleConfig(timestep_spacing="trailing", rescale_betas_zero_snr=True)],
                         ids=["leading", "trailing", "zero-snr"])  # zero SNR: ᾱ_T = 2⁻²⁴, σ_max = 4096 (not ∞)
@pytest.mark.parametrize("name, cls", [("euler", EulerDiscreteScheduler), ("euler_ancestral", EulerAncestralDiscreteScheduler)])
def test_euler_noise_level_is_defined_before_set_timesteps_as_in_diffusers(name, cls, config):
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


def test_a1111_api_names_and_schedule_types_map_to_ours():
    assert from_a1111_combined("k_euler") == ("euler", None)
    assert from_a1111_combined(" K_DPMPP_2M ") == ("dpmpp_2m", None)
    assert from_a1111_combined("k_lms") == ("k_lms", None)  # not ours: passed through as given, for check_sampler to refuse
    # A1111's "Schedule type" labels (modules/sd_schedulers.py); "Automatic" is the model's own default
    a1111 = {"Automatic": None, "Uniform": "normal", "Normal": "normal", "Karras": "karras", "Exponential": "exponential",
             "SGM Uniform": "sgm_uniform", "Simple": "simple", "DDIM": "ddim_uniform"}
    for label, schedule in a1111.items():
        assert schedule_from_a1111(label) == schedule_from_a1111(f" {label.upper()} ") == schedule, label
    assert schedule_from_a1111("karras") == "karras"  # our own names pass through
    assert schedule_from_a1111("Beta") == "beta"  # one we lack: named, for the caller to refuse (None would mean Automatic)
