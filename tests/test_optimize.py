"""The inference levers change speed and memory, never the image (tiny random models; timings live in benchmarks/)."""
import copy

import pytest
import torch

from torch import nn

from latentdiff.optimize import (LeanAttnProcessor, PrepackedConv2d, PrepackedLinear, enable_tiled_decode,
                               optimize_for_inference, use_lean_attention, use_prepacked_weights)
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


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not built into this torch")


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_layers_compute_what_the_plain_ones_do(dtype):
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no native bf16 on this CPU")
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.Conv2d(16, 8, 1))
    plain, lin = plain.to(dtype), nn.Linear(8, 24).to(dtype)
    packed, packed_lin = copy.deepcopy(plain), copy.deepcopy(lin)
    assert use_prepacked_weights(packed, packed_lin) == 4
    assert all(type(m) is PrepackedConv2d for m in packed) and type(packed_lin) is PrepackedLinear
    with torch.inference_mode():
        for shape in ((2, 8, 16, 16), (1, 8, 12, 20), (2, 8, 16, 16)):  # a new shape repacks; going back repacks again
            x = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(packed(x), plain(x), atol=1e-5, rtol=1e-5)
            tokens = torch.randn(shape[0], 7, 8, dtype=dtype)
            torch.testing.assert_close(packed_lin(tokens), lin(tokens), atol=1e-5, rtol=1e-5)
        packed_lin.load_state_dict({"weight": lin.weight * 2, "bias": lin.bias})  # in-place update: the pack follows
        torch.testing.assert_close(packed_lin(tokens), nn.functional.linear(tokens, lin.weight * 2, lin.bias), atol=1e-5, rtol=1e-5)
        for model in (packed, plain):  # `.data` edits bypass the version counter (peft's LoRA merge makes them)
            for conv in model:
                conv.weight.data += 0.25
        torch.testing.assert_close(packed(x), plain(x), atol=1e-5, rtol=1e-5)
    assert packed.state_dict().keys() == plain.state_dict().keys()
    copy.deepcopy(packed)  # the opaque oneDNN tensor is dropped, not copied


@needs_onednn
def test_prepacked_layers_built_in_inference_mode():
    with torch.inference_mode():  # a model loaded under inference_mode holds inference tensors: no version counter
        conv, lin = nn.Conv2d(4, 8, 3, padding=1), nn.Linear(8, 8)
        packed_conv, packed_lin = copy.deepcopy(conv), copy.deepcopy(lin)
        use_prepacked_weights(packed_conv, packed_lin)
        x = torch.randn(1, 4, 8, 8)
        torch.testing.assert_close(packed_conv(x), conv(x))
        tokens = torch.randn(1, 8, 5).mT  # a strided view, as activations often are
        torch.testing.assert_close(packed_lin(tokens), lin(tokens))


@needs_onednn
def test_prepacked_layer_follows_a_peft_lora_merge():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    use_prepacked_weights(model)
    model = inject_adapter_in_model(LoraConfig(r=4, target_modules=["0"], init_lora_weights=False), model)
    x = torch.randn(3, 16)
    with torch.inference_mode():
        with_adapter = model(x)
        model[0].merge()  # writes `weight.data += delta` into the prepacked base layer
        torch.testing.assert_close(model(x), with_adapter)
        model[0].unmerge()
        torch.testing.assert_close(model(x), with_adapter)


@needs_onednn
def test_prepacked_layers_keep_autograd():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    packed = copy.deepcopy(conv)
    use_prepacked_weights(packed)
    x = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        packed(x)  # a pack exists, but a training call must not use it: it has no gradient
    packed(x).sum().backward()
    conv(x).sum().backward()
    torch.testing.assert_close(packed.weight.grad, conv.weight.grad)


@needs_onednn
def test_weights_are_not_prepacked_when_the_copy_would_not_fit(monkeypatch, caplog):
    """The packed copy doubles the weights (10 GB more for SDXL's UNet in float32): over half the available memory,
    the layers stay plain and one warning says why; within it, they are swapped."""
    import latentdiff.optimize as optimize

    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Linear(8, 8))  # 4 × (8·4·9 + 8·8) = 1408 bytes of weights
    assert optimize.available_memory() > 2**20  # this machine's /proc/meminfo is read
    monkeypatch.setattr(optimize, "available_memory", lambda: 2 * 1408 - 1)
    with caplog.at_level("WARNING", logger="latentdiff.optimize"):
        assert use_prepacked_weights(model) == 0
    assert type(model[0]) is nn.Conv2d and "would take more than half" in caplog.text
    monkeypatch.setattr(optimize, "available_memory", lambda: 2 * 1408)
    assert use_prepacked_weights(model) == 2 and isinstance(model[0], PrepackedConv2d)


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
