"""Shared fixtures: tiny random Stable Diffusion-layout models, built once per session under a fixed seed."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite runs on the CPU wherever it runs: exact-resume tests are bit-exact only there (cuDNN picks
# nondeterministic kernels), and several processes on one GPU collide in NCCL. Tests marked `cuda` name the GPU.
os.environ.setdefault("ACCELERATE_USE_CPU", "true")

import pytest
import torch


def tiny_components(seed: int = 0, *, cross_dim: int = 32, sample_size: int = 8, in_channels: int = 4):
    """UNet/VAE/CLIP text encoder with the real SD classes and layout, a few hundred thousand parameters each.

    in_channels=9: the UNet of the sd-1.5-inpainting layout (latents + mask + masked-image latents)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from latentdiff.text import build_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
        sample_size=sample_size * 2,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=cross_dim, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=cross_dim,
    ))
    return unet.eval(), vae.eval(), text_encoder.eval(), build_clip_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A diffusers-format folder of a tiny random model, saved by latentdiff (SD's scaled_linear schedule)."""
    from latentdiff.pipeline import LatentDiffusionPipeline
    from latentdiff.schedulers import ScheduleConfig

    unet, vae, text_encoder, tokenizer = tiny_components()
    folder = tmp_path_factory.mktemp("models") / "tiny-sd"
    LatentDiffusionPipeline(unet, vae, text_encoder, tokenizer, ScheduleConfig()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_inpaint_model_dir(tmp_path_factory):
    """The same, with a 9-channel inpainting UNet (random weights)."""
    from latentdiff.pipeline import LatentDiffusionPipeline
    from latentdiff.schedulers import ScheduleConfig

    unet, vae, text_encoder, tokenizer = tiny_components(in_channels=9)
    folder = tmp_path_factory.mktemp("models") / "tiny-sd-inpainting"
    LatentDiffusionPipeline(unet, vae, text_encoder, tokenizer, ScheduleConfig()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def serve_folders(tmp_path_factory):
    """A models folder (a copy of the shipped model, a broken file), a LoRA folder, an embeddings folder, and a
    file outside them."""
    import shutil

    from latentdiff.pipeline import DEFAULT_MODEL

    root = tmp_path_factory.mktemp("serve")
    models, loras = root / "models", root / "loras"
    models.mkdir(), loras.mkdir()
    shutil.copytree(DEFAULT_MODEL, models / "shapes-copy")  # the same weights under another name
    (models / "broken.safetensors").write_bytes(b"not a model")
    (loras / "style.safetensors").write_bytes(b"")
    (root / "secret.safetensors").write_bytes(b"outside the models folder")
    (root / "embeddings").mkdir()
    from safetensors.torch import save_file
    save_file({"emb_params": torch.randn(2, 128, generator=torch.Generator().manual_seed(0))},  # A1111 layout,
              root / "embeddings" / "filmgrain.safetensors")  # two vectors for the shipped 128-wide text encoder
    return root


@pytest.fixture(scope="session")
def server(serve_folders):
    """The real `latentdiff serve` server (API and UI) on the shipped model, on a free localhost port; one for the
    session, so tests/test_server.py and tests/test_server_ui.py load and warm up the model once."""
    import importlib.util

    from helpers import start_server
    from latentdiff.commands.serve import Settings

    srv = start_server(Settings(models_dir=serve_folders / "models", lora_dir=serve_folders / "loras",
                                embeddings_dir=serve_folders / "embeddings", outdir=serve_folders / "out",
                                max_body_bytes=2**20,
                                ui=importlib.util.find_spec("gradio") is not None))
    yield srv
    srv.stop()
