"""On a CUDA GPU: graph replay against eager, the fallback, a LoRA after capture, the fp16 VAE's retry.

`python -m pytest -m cuda` runs these where a GPU is (they skip elsewhere); their CPU twins with a stand-in graph
are in test_device_policy.py.
"""
import pytest
import torch
from helpers import random_lora_file

from latentdiff.optimize import CUDAGraphUNet
from latentdiff.pipeline import EagerUNet, load_pipeline

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
def pipe(tiny_model_dir):
    return load_pipeline(tiny_model_dir, device="cuda", precision="fp16")


def _image(pipe, **kwargs):
    return pipe(["a red circle", "a blue star"], seed=3, num_inference_steps=4, output_type="pt", progress=False, **kwargs).images


def test_cuda_policy_nchw_fp16_and_graphs(pipe):
    assert isinstance(pipe.denoiser, CUDAGraphUNet)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.float16
    conv = pipe.unet.conv_in.weight
    assert conv.is_contiguous()  # NCHW on CUDA


def test_graph_replay_equals_eager_within_fp16_tolerance(pipe):
    graphed = _image(pipe)
    assert pipe.denoiser._graphs, "the UNet call was captured"
    pipe.denoiser = EagerUNet(pipe.unet)
    torch.testing.assert_close(graphed, _image(pipe), atol=2e-3, rtol=0)


def test_capture_failure_falls_back_to_eager(pipe, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "graph", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no capture")))
    with caplog.at_level("WARNING", logger="latentdiff.optimize"):
        out = _image(pipe)
    assert "capture of the UNet failed" in caplog.text and torch.isfinite(out).all()


def test_lora_loaded_after_capture_changes_the_output(pipe, tiny_model_dir, tmp_path):
    lora = random_lora_file(tiny_model_dir, tmp_path / "l.safetensors")
    before = _image(pipe)
    pipe.load_lora(lora)
    assert (_image(pipe) - before).abs().max() > 1e-3


def test_fp16_vae_overflow_is_retried_in_fp32(pipe):
    latents = pipe("a cat", seed=0, num_inference_steps=2, output_type="latents", progress=False).images
    pipe.vae.to(torch.float32)
    with torch.no_grad():
        pipe.vae.decoder.conv_out.weight.mul_(1e6)
    reference = pipe.decode(latents)
    pipe.vae.to(torch.float16)
    torch.testing.assert_close(pipe.decode(latents), reference, atol=1e-2, rtol=0)
    assert pipe.vae.dtype == torch.float16
