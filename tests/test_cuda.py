"""On a CUDA GPU: graph replay against eager, the fallback, a LoRA after capture, the fp16 VAE's retry.

`python -m pytest -m cuda` runs these where a GPU is (they skip elsewhere); their CPU twins with a stand-in graph
are in test_device_policy.py.
"""
import pytest
import torch

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
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = load_pipeline(tiny_model_dir, device="cpu", precision="fp32", optimize=False)
    donor.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    with torch.no_grad():
        for name, p in donor.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    StableDiffusionPipeline.save_lora_weights(tmp_path, weight_name="l.safetensors", safe_serialization=True,
                                              unet_lora_layers=get_peft_model_state_dict(donor.unet))
    before = _image(pipe)
    pipe.load_lora(tmp_path / "l.safetensors")
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
