"""The inference levers change speed and memory, never the image (tiny random models; timings live in benchmarks/)."""
import copy

import pytest
import torch

from latentdiff.optimize import LeanAttnProcessor, enable_tiled_decode, optimize_for_inference, use_lean_attention
from latentdiff.pipeline import LatentDiffusionPipeline, load_pipeline
from latentdiff.schedulers import ScheduleConfig

from conftest import tiny_components


@pytest.fixture(scope="module")
def tiny_pipe():
    return LatentDiffusionPipeline(*tiny_components(), ScheduleConfig()).to("cpu")


def _generate(pipe, size=16):
    return pipe("a red circle", height=size, width=size, num_inference_steps=4, seed=3, output_type="pt", progress=False).images


def test_optimized_pipeline_gives_the_same_image(tiny_pipe):
    reference = _generate(tiny_pipe)
    fast = optimize_for_inference(copy.deepcopy(tiny_pipe))
    torch.testing.assert_close(_generate(fast), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cross", [False, True])
def test_lean_attention_matches_diffusers_sdpa(cross):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=16 if cross else None, heads=4, dim_head=8).eval()
    x, context = torch.randn(2, 10, 32), torch.randn(2, 7, 16) if cross else None
    mask = torch.zeros(2, 1, 10 if context is None else 7, dtype=torch.bool)
    mask[..., :5] = True
    for kwargs in ({}, {"attention_mask": mask}):  # a mask goes to diffusers' own processor
        expected = AttnProcessor2_0()(attn, x, context, **kwargs)
        torch.testing.assert_close(LeanAttnProcessor()(attn, x, context, **kwargs), expected, atol=1e-6, rtol=1e-5)


def test_lean_attention_covers_the_unet_and_leaves_the_vae_alone(tiny_pipe):
    unet, vae = copy.deepcopy(tiny_pipe.unet), copy.deepcopy(tiny_pipe.vae)
    assert use_lean_attention(unet) == len(unet.attn_processors)  # every self- and cross-attention block
    assert use_lean_attention(vae) == 0  # group norm + residual inside the VAE's attention: not a plain block


def test_tiled_decode_leaves_small_images_exact_and_blends_large_ones(tiny_pipe):
    vae = copy.deepcopy(tiny_pipe.vae)
    small, large = (torch.randn(1, 4, n, n, generator=torch.Generator().manual_seed(0)) for n in (16, 32))
    with torch.inference_mode():
        whole_small, whole_large = vae.decode(small).sample, vae.decode(large).sample
        enable_tiled_decode(vae)
        vae.tile_latent_min_size, vae.tile_sample_min_size = 16, 32  # 3×3 overlapping tiles on the 32×32 latent
        torch.testing.assert_close(vae.decode(small).sample, whole_small, atol=0, rtol=0)  # one tile: untouched
        tiled = vae.decode(large).sample
    # Each tile normalises with its own GroupNorm statistics, so tiling is approximate (why tiles start above 1024 px).
    mse = torch.mean(((tiled - whole_large) / 2) ** 2)  # pixels in [-1, 1] → [0, 1]
    assert 10 * torch.log10(1 / mse) > 20  # dB


def test_load_pipeline_applies_the_levers(tiny_model_dir):
    pipe = load_pipeline(tiny_model_dir, device="cpu", precision="fp32")
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.vae.use_tiling
    assert all(isinstance(p, LeanAttnProcessor) for p in pipe.unet.attn_processors.values())
    assert _generate(pipe).shape == (1, 3, 16, 16)


def test_compile_is_opt_in(tiny_model_dir):
    assert load_pipeline(tiny_model_dir, device="cpu", precision="fp32").unet._compiled_call_impl is None
    assert load_pipeline(tiny_model_dir, device="cpu", precision="fp32", compile=True).unet._compiled_call_impl is not None
