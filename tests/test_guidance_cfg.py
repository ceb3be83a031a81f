"""Classifier-free guidance, both halves: the sampling-time combination and the training-time caption dropout."""
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from latentdiff.guidance import cfg_combine, drop_captions, rescale_guidance, unconditional_skips


def test_cfg_combine_is_uncond_plus_scale_times_difference():
    # ε̂ = ε_u + s·(ε_c − ε_u) (Ho & Salimans 2022, eq. 6 with w = s − 1)
    eps_u, eps_c = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 1.0, 0.5])
    torch.testing.assert_close(cfg_combine(eps_u, eps_c, 7.5), torch.tensor([16.0, 20.5, 0.5]), atol=0, rtol=0)
    torch.testing.assert_close(cfg_combine(eps_u, eps_c, 1.0), eps_c, atol=0, rtol=0)  # s = 1: the conditional alone
    torch.testing.assert_close(cfg_combine(eps_u, eps_c, 0.0), eps_u, atol=0, rtol=0)


def test_drop_captions_draws_one_uniform_per_caption_and_keeps_those_at_or_above_the_rate():
    texts = [f"caption {i}" for i in range(64)]
    u = torch.rand(64, generator=torch.Generator().manual_seed(3))  # what drop_captions draws from the same generator
    out = drop_captions(texts, 0.3, torch.Generator().manual_seed(3))
    assert out == [t if x >= 0.3 else "" for t, x in zip(texts, u.tolist())]
    assert 0 < out.count("") < 64
    # the boundary: a caption whose draw equals the rate is kept (u >= rate), so rate 0 keeps every caption
    at = drop_captions(texts[:1], float(u[0]), torch.Generator().manual_seed(3))
    assert at == texts[:1]
    assert drop_captions(texts, 0.0, torch.Generator().manual_seed(0)) == texts
    assert drop_captions(texts, 1.0, torch.Generator().manual_seed(0)) == [""] * 64


def test_drop_captions_is_a_function_of_the_generator_alone():
    texts = ["a", "b", "c", "d", "e", "f", "g", "h"]
    torch.manual_seed(0)
    a = drop_captions(texts, 0.5, torch.Generator().manual_seed(11))
    torch.manual_seed(1)  # the global RNG must not matter: resumed runs replay the same dropout
    b = drop_captions(texts, 0.5, torch.Generator().manual_seed(11))
    assert a == b


def test_unconditional_skips_follow_a1111s_ngms_rule():
    """A1111's CFGDenoiser: skip the uncond pass where σ < s_min_uncond, on odd steps (counted from the first step
    run) or, with "NGMS all steps", on every one; σ equal to the threshold keeps it."""
    sigmas = [10.0, 5.0, 1.5, 1.0, 0.5, 0.2, 0.0]
    assert unconditional_skips(sigmas, 0, 1.5, False) == [False, False, False, True, False, True]
    assert unconditional_skips(sigmas, 0, 1.5, True) == [False, False, False, True, True, True]
    assert unconditional_skips(sigmas, 1, 1.5, False) == [False, False, False, False, True, False]  # img2img from step 1
    assert unconditional_skips(sigmas, 0, 0.0, True) == [False] * 6  # 0: off
    assert unconditional_skips(sigmas, 0, 100.0, True) == [True] * 6


def test_unconditional_skips_threshold_below_one_is_on():
    """Any σ threshold above 0 turns NGMS on, fractional ones too (the shipped model's is 0.9)."""
    sigmas = [2.0, 0.8, 0.5, 0.3, 0.0]
    assert unconditional_skips(sigmas, 0, 0.9, True) == [False, True, True, True]
    assert unconditional_skips(sigmas, 0, 0.9, False) == [False, True, False, True]
    assert unconditional_skips(sigmas, 0, -1.0, True) == [False] * 4  # below 0: off as well


def test_rescale_guidance_matches_diffusers_rescale_noise_cfg():
    """Lin et al. 2023 §3.4 as diffusers' StableDiffusionPipeline applies guidance_rescale: per image std over
    (C, H, W). Images and channels get different spreads, so a std over the wrong axes shows."""
    g = torch.Generator().manual_seed(0)
    spread = torch.tensor([0.5, 3.0]).view(2, 1, 1, 1) * torch.tensor([1.0, 2.0, 4.0, 0.25]).view(1, 4, 1, 1)
    eps_cond = torch.randn(2, 4, 3, 5, generator=g) * spread
    eps_cfg = torch.randn(2, 4, 3, 5, generator=g) * spread.flip(0) + 0.3
    for phi in (0.0, 0.7, 1.0):
        torch.testing.assert_close(rescale_guidance(eps_cfg, eps_cond, phi), rescale_noise_cfg(eps_cfg, eps_cond, phi),
                                   atol=1e-6, rtol=1e-6)
    full = rescale_guidance(eps_cfg, eps_cond, 1.0)  # φ = 1: each image takes the conditional prediction's std
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), eps_cond.std(dim=(1, 2, 3)), atol=1e-5, rtol=1e-5)
