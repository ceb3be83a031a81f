"""The denoising loop never waits for the device, and each device gets its own speed levers.

On CUDA every device → host read (`.item()`, `bool()`, `float()`, `int()` of a tensor, `.tolist()`, `.cpu()`)
stalls the launch queue; the loop must have none. The check runs on the CPU by making those calls fail.
"""
import pytest
import torch
from helpers import random_lora_file

from latentdiff.optimize import CUDAGraphUNet
from latentdiff.pipeline import load_pipeline
from latentdiff.schedulers import SAMPLERS, get_sampler

SYNCING = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy")


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return load_pipeline(tiny_model_dir, device="cpu", precision="fp32")


def _scheduler(pipe, sampler):
    s = get_sampler(sampler, pipe.schedule)
    s.set_timesteps(4, device=pipe.device)
    return s


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("min_sigma", [(0.0, False), (2.0, False)], ids=["guided", "ngms"])
def test_denoising_loop_reads_nothing_back_from_the_device(pipe, sampler, min_sigma, monkeypatch):
    def gens():
        return [torch.Generator().manual_seed(s) for s in (0, 1)]

    with torch.inference_mode():
        context = pipe.encode_prompt(["a cat", "a dog"], ["", ""])
        latents = pipe.prepare_latents(2, 16, 16, gens(), _scheduler(pipe, sampler))
        reference = pipe.denoise(latents.clone(), context, _scheduler(pipe, sampler), 5.0, gens(), start=1,
                                 guidance_min_sigma=min_sigma)

        def refuse(name):
            def sync(self, *args, **kwargs):
                raise AssertionError(f"host sync in the denoising loop: Tensor.{name}")
            return sync

        scheduler = _scheduler(pipe, sampler)
        for name in SYNCING:
            monkeypatch.setattr(torch.Tensor, name, refuse(name))
        out = pipe.denoise(latents.clone(), context, scheduler, 5.0, gens(), start=1, guidance_min_sigma=min_sigma)
        monkeypatch.undo()
    torch.testing.assert_close(out, reference, atol=0, rtol=0)


# --- CUDA-graph replay: its bookkeeping, on the CPU with a stand-in for the captured graph ------------------------

class ReplayedEagerly(CUDAGraphUNet):
    """`_capture` without CUDA: the 'graph' runs the UNet on the static buffers and writes into the static output,
    exactly what a replay does; everything else (keys, buffers, LoRA tracking, fallback) is the real class."""

    captures = 0

    def _capture(self, x, t, condition):
        type(self).captures += 1
        static_x, static_t, static_condition = x.clone(), t.clone(), condition.map(torch.clone)
        out = self.unet(static_x, static_t, **static_condition.unet_kwargs(), return_dict=False)[0]

        class Graph:
            def replay(_):
                out.copy_(self.unet(static_x, static_t, **static_condition.unet_kwargs(), return_dict=False)[0])

        return Graph(), static_x, static_t, static_condition, out


@pytest.fixture
def graphed(tiny_model_dir):
    pipe = load_pipeline(tiny_model_dir, device="cpu", precision="fp32", optimize=False)
    pipe.denoiser = ReplayedEagerly(pipe.unet)
    ReplayedEagerly.captures = 0
    return pipe


def _image(pipe, **kwargs):
    return pipe("a red circle", seed=3, num_inference_steps=3, output_type="pt", progress=False, **kwargs).images


def test_replay_equals_eager_and_captures_once_per_shape(graphed, tiny_model_dir):
    eager = load_pipeline(tiny_model_dir, device="cpu", precision="fp32", optimize=False)
    torch.testing.assert_close(_image(graphed), _image(eager), atol=0, rtol=0)
    _image(graphed)
    assert ReplayedEagerly.captures == 1  # one (batch, size, dtype): every later step and call replays
    _image(graphed, height=24)
    assert ReplayedEagerly.captures == 2


def test_lora_loaded_scaled_or_merged_after_capture_takes_effect(graphed, tiny_model_dir, tmp_path):
    lora = random_lora_file(tiny_model_dir, tmp_path / "l.safetensors")
    plain = _image(graphed)
    graphed.load_lora(lora, scale=1.0)
    with_lora = _image(graphed)
    assert (with_lora - plain).abs().max() > 1e-3, "the LoRA loaded after capture changes the image"
    graphed.set_lora_scales({"l": 0.0})  # a scale change: peft's layer scaling, no new layers
    torch.testing.assert_close(_image(graphed), plain, atol=1e-5, rtol=0)
    graphed.set_lora_scales({"l": 1.0})
    graphed.unet.fuse_lora() if hasattr(graphed.unet, "fuse_lora") else None
    for m in graphed.unet.modules():  # a merge writes the weights in place and turns the adapter path off
        if hasattr(m, "merge") and hasattr(m, "merged") and not m.merged:
            m.merge()
    torch.testing.assert_close(_image(graphed), with_lora, atol=1e-4, rtol=0)


def test_capture_failure_falls_back_to_eager_with_one_warning(graphed, tiny_model_dir, caplog, monkeypatch):
    def broken(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphed.denoiser, "_capture", broken)
    eager = load_pipeline(tiny_model_dir, device="cpu", precision="fp32", optimize=False)
    with caplog.at_level("WARNING", logger="latentdiff.optimize"):
        torch.testing.assert_close(_image(graphed), _image(eager), atol=0, rtol=0)
        _image(graphed)
    assert caplog.text.count("CUDA graph capture of the UNet failed") == 1


def test_fp16_vae_overflow_decodes_again_in_float32(tiny_model_dir, caplog):
    pipe = load_pipeline(tiny_model_dir, device="cpu", precision="fp32", optimize=False)
    latents = pipe("a cat", seed=0, num_inference_steps=2, output_type="latents", progress=False).images
    with torch.no_grad():
        pipe.vae.decoder.conv_out.weight.mul_(1e6)  # pixels beyond fp16's 65504 before the clamp to [0, 1]
    reference = pipe.decode(latents)
    pipe.vae.to(torch.float16)
    with caplog.at_level("WARNING", logger="latentdiff.vae"):
        retried = pipe.decode(latents)
    assert "decoding again in float32" in caplog.text
    assert pipe.vae.dtype == torch.float16
    torch.testing.assert_close(retried, reference, atol=1e-2, rtol=0)


def test_vae_marked_fp16_safe_loads_in_fp16(tiny_model_dir, tmp_path):
    import json
    import shutil

    safe = tmp_path / "safe"
    shutil.copytree(tiny_model_dir, safe)
    config = json.loads((safe / "vae" / "config.json").read_text())
    (safe / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    assert load_pipeline(safe, device="cpu", precision="fp16", optimize=False).vae.dtype == torch.float16
    assert load_pipeline(tiny_model_dir, device="cpu", precision="fp16", optimize=False).vae.dtype == torch.float32
