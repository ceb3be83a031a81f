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


def tiny_sdxl_components(seed: int = 0):
    """A tiny random model of the SDXL architecture (diffusers' own test sizes: CLIP encoders of 5 layers, the second
    with a 32-wide projection; a UNet with the "text_time" added embedding). The second encoder is 48 wide, not 32:
    diffusers' from_single_file tells the two embedders apart by width and would load the first one's weights into
    both."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from latentdiff.text import build_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids × 8 + the pooled text's 32
        cross_attention_dim=32 + 48, norm_num_groups=1,  # the two encoders' hidden states side by side
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, sample_size=64, scaling_factor=0.13025,
    )
    config = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4,
                  max_position_embeddings=77, hidden_act="gelu", projection_dim=32, layer_norm_eps=1e-5)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**config, "hidden_size": 48}))
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=build_clip_tokenizer(),
                text_encoder_2=text_encoder_2.eval(), tokenizer_2=build_clip_tokenizer(pad_token="!"))


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    """A tiny SDXL folder written by diffusers' StableDiffusionXLPipeline (the layout real SDXL folders have)."""
    import json

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from latentdiff.checkpoints.single_file import SHIPPED_CONFIGS

    scheduler = EulerDiscreteScheduler.from_config(json.loads((SHIPPED_CONFIGS / "sdxl/scheduler/scheduler_config.json").read_text()))
    folder = tmp_path_factory.mktemp("models") / "tiny-sdxl"
    StableDiffusionXLPipeline(**tiny_sdxl_components(), scheduler=scheduler).save_pretrained(folder)
    return folder


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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (pytestmark = pytest.mark.usefixtures("one_thread")): tiny models gain nothing
    from more, and on a shared 2-core box they lose 5-10x to oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
