"""SDXL: loading (diffusers folders, sgm single files) and text to image, image-to-image and inpainting against
diffusers' StableDiffusionXL(Img2Img/Inpaint)Pipeline, on a tiny random model of the SDXL architecture
(conftest.tiny_sdxl_components, the `sdxl_dir` fixture)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_pipeline import DIFFUSERS_SCHEDULERS

from latentdiff.pipeline import load_pipeline

PROMPTS = ["a red circle on a blue background", "a green star"]
SIZE = dict(height=32, width=32)
TOLERANCE = 2 / 255


@pytest.fixture(scope="module")
def pipe(sdxl_dir):
    return load_pipeline(sdxl_dir, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def reference(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(sdxl_dir)


def _diffusers(reference, sampler: str, cls: str | None = None):
    """diffusers' SDXL pipeline (or its `cls` sibling on the same components) with `sampler`'s scheduler."""
    import diffusers

    ref = reference if cls is None else getattr(diffusers, cls)(**reference.components)
    ref.scheduler = getattr(diffusers, DIFFUSERS_SCHEDULERS[sampler]).from_config(reference.scheduler.config)
    return ref


def _theirs(reference, sampler: str, prompts=PROMPTS, **kwargs):
    """prompts=None: the images of kwargs' prompt_embeds."""
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)][:len(prompts or kwargs["prompt_embeds"])]
    return _diffusers(reference, sampler)(prompts, num_inference_steps=4, guidance_scale=5.0, generator=gens,
                                          output_type="pt", **SIZE, **kwargs).images


def _ours(pipe, sampler: str, negative=None, prompts=PROMPTS, **kwargs):
    return pipe(prompts, negative, num_inference_steps=4, guidance_scale=5.0,
                seed=[3, 4][:len(prompts or kwargs["prompt_embeds"])],
                sampler=sampler, output_type="pt", progress=False, **SIZE, **kwargs).images


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler"])
def test_text_to_image_matches_diffusers(pipe, reference, sampler):
    """With negatives; and without, where SDXL's force_zeros_for_empty_prompt makes the unconditional input zeros."""
    ours = _ours(pipe, sampler, "blurry")
    theirs = _theirs(reference, sampler, negative_prompt=["blurry"] * 2)
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert (ours - theirs).abs().max().item() < TOLERANCE
    assert (_ours(pipe, sampler) - _theirs(reference, sampler)).abs().max().item() < TOLERANCE


def test_size_conditioning_and_clip_skip_match_diffusers(pipe, reference):
    """One prompt: diffusers repeats [negative; positive] time ids per image, which pairs them right only for one."""
    sizes = dict(original_size=(96, 64), crops_coords_top_left=(8, 16), target_size=(48, 48),
                 negative_original_size=(16, 24), negative_target_size=(32, 40))
    ours = _ours(pipe, "ddim", "blurry", PROMPTS[:1], **sizes)
    theirs = _theirs(reference, "ddim", PROMPTS[:1], negative_prompt="blurry", negative_crops_coords_top_left=(8, 16),
                     **sizes)
    assert (ours - theirs).abs().max().item() < TOLERANCE
    plain = _ours(pipe, "ddim", "blurry", PROMPTS[:1])
    assert (ours - plain).abs().max().item() > 1e-3, "the size conditioning reaches the UNet"
    # A1111's clip skip k is diffusers' k − 1 (no negative prompt: diffusers encodes negatives without clip skip)
    skipped = _ours(pipe, "ddim", clip_skip=2)
    assert (skipped - _theirs(reference, "ddim", clip_skip=1)).abs().max() < TOLERANCE


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_image_to_image_matches_diffusers(pipe, reference, sampler):
    """The init latents' size (here not the native one) is the default original and target size."""
    image = torch.rand(2, 3, 40, 32, generator=torch.Generator().manual_seed(0))
    kwargs = dict(image=image, strength=0.6, num_inference_steps=5, guidance_scale=5.0)
    ours = pipe(PROMPTS, "blurry", seed=[3, 4], sampler=sampler, output_type="pt", progress=False, **kwargs).images
    expected = _diffusers(reference, sampler, "StableDiffusionXLImg2ImgPipeline")(
        PROMPTS, negative_prompt=["blurry"] * 2, generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
        output_type="pt", **kwargs).images
    assert ours.shape == expected.shape == (2, 3, 40, 32)
    assert (ours - expected).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("sampler, strength", [("ddim", 1.0), ("euler", 0.7)])
def test_inpainting_matches_diffusers(pipe, reference, sampler, strength):
    """A regular SDXL UNet: the kept region re-noised and blended in every step, latents as
    StableDiffusionXLInpaintPipeline's, pixels too once the original is pasted back (mask_blur=0: no feather)."""
    from latentdiff import images

    init = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(32, 32)
    mask[6:22, 10:26] = 1
    kwargs = dict(image=init, mask_image=mask, num_inference_steps=5, guidance_scale=5.0, strength=strength)
    ours = pipe(PROMPTS, "blurry", mask_blur=0, seed=[3, 4], sampler=sampler, output_type="pt", progress=False,
                **kwargs).images
    expected = _diffusers(reference, sampler, "StableDiffusionXLInpaintPipeline")(
        PROMPTS, negative_prompt=["blurry"] * 2, generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
        output_type="pt", **SIZE, **kwargs).images
    assert (ours - images.paste_back(expected, init, mask)).abs().max().item() < TOLERANCE


def test_long_and_weighted_prompts_reach_both_encoders(pipe):
    def latents(prompts, **kwargs):
        return pipe(prompts, seed=[3, 4][:len(prompts)], num_inference_steps=2, output_type="latents", progress=False,
                    **kwargs).images

    plain = latents(PROMPTS, **SIZE)
    assert (latents(PROMPTS[:1], **SIZE)[0] - plain[0]).abs().max() < 1e-4, "an image does not depend on its batch"
    weighted = latents(["a (red:1.6) circle on a blue background", PROMPTS[1]], **SIZE)
    assert (weighted[0] - plain[0]).abs().max() > 1e-3 and (weighted[1] - plain[1]).abs().max() < 1e-4
    long = latents([PROMPTS[0] + " very" * 80 + " blue", PROMPTS[1]], **SIZE)  # two chunks beside one: two groups
    assert (long[0] - plain[0]).abs().max() > 1e-3 and (long[1] - plain[1]).abs().max() < 1e-4
    unguided = latents(PROMPTS, guidance_scale=1.0)
    assert unguided.shape == (2, 4, 32, 32)  # no unconditional rows; the native 64² size


def test_default_size_comes_from_the_model(pipe):
    from latentdiff.checkpoints.single_file import SHIPPED_CONFIGS

    assert pipe.is_sdxl and pipe.check_size(None, None) == (64, 64)  # sample_size 32 × VAE factor 2
    unet = json.loads((SHIPPED_CONFIGS / "sdxl" / "unet" / "config.json").read_text())
    vae = json.loads((SHIPPED_CONFIGS / "sdxl" / "vae" / "config.json").read_text())
    assert unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1) == 1024
    assert (vae["scaling_factor"], vae["force_upcast"]) == (0.13025, True)


def test_single_file_round_trip_is_bit_exact_and_loads_in_diffusers(tmp_path, pipe, sdxl_dir, reference):
    """`latentdiff convert` folder → sgm single file → folder, bit for bit; the file without our metadata loads with
    config_dir here and in diffusers' from_single_file."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file, save_file

    from latentdiff.cli import main

    file, folder = tmp_path / "xl.safetensors", tmp_path / "back"
    assert main(["convert", str(sdxl_dir), str(file)]) == 0 and main(["convert", str(file), str(folder)]) == 0
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = ({k.removeprefix("text_model."): v for f in (root / sub).glob("*.safetensors") for k, v in load_file(f).items()}
                for root in (sdxl_dir, folder))  # transformers 5 writes CLIPTextModel keys without `text_model.`
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    state = load_file(file)
    for prefix in ("conditioner.embedders.0.transformer.text_model.encoder.", "conditioner.embedders.1.model.transformer.resblocks.",
                   "model.diffusion_model.label_emb.0.0.", "first_stage_model.decoder."):
        assert any(k.startswith(prefix) for k in state), prefix
    projection = pipe.text_encoder_2.text_projection.weight
    assert torch.equal(state["conditioner.embedders.1.model.text_projection"], projection.T)  # OpenCLIP: x @ P
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in state
    plain = tmp_path / "plain.safetensors"
    save_file(state, plain)  # no latentdiff metadata: configs from config_dir, as for a downloaded file
    copy = load_pipeline(plain, device="cpu", precision="fp32", config_dir=sdxl_dir, optimize=False)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(pipe, name).state_dict(), getattr(copy, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    single = StableDiffusionXLPipeline.from_single_file(str(plain), config=str(sdxl_dir))
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        a, b = getattr(single, name).state_dict(), getattr(reference, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b if not k.endswith("position_ids")), name


def test_folder_round_trip_through_save_pretrained(tmp_path, pipe):
    from diffusers import StableDiffusionXLPipeline

    pipe.save_pretrained(tmp_path / "copy")
    index = json.loads((tmp_path / "copy" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    theirs = StableDiffusionXLPipeline.from_pretrained(tmp_path / "copy")
    a, b = pipe.text_encoder_2.state_dict(), theirs.text_encoder_2.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    copy = load_pipeline(tmp_path / "copy", device="cpu", precision="fp16", optimize=False)
    assert (copy.unet.dtype, copy.text_encoder_2.dtype, copy.vae.dtype) == (torch.float16,) * 2 + (torch.float32,)  # force_upcast
    a, b = pipe.text_encoder_2.state_dict(), copy.text_encoder_2.state_dict()
    assert all(torch.equal(a[k].to(b[k].dtype), b[k]) for k in a) and copy.tokenizer_2.pad_token == "!"


def test_from_config_builds_an_sdxl_pipeline_from_component_configs(tmp_path, pipe):
    """A folder of SDXL component configs (as latentdiff/configs/sdxl, here the tiny model's) → random SDXL weights,
    tokenizer settings from tokenizer{,_2}_config.json: what training from scratch and the SDXL benchmark start from."""
    from latentdiff.pipeline import LatentDiffusionPipeline

    configs = tmp_path / "configs"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        getattr(pipe, name).config.save_pretrained(configs / name) if name.startswith("text") else getattr(pipe, name).save_config(configs / name)
    (configs / "tokenizer_2_config.json").write_text(json.dumps({"pad_token": "!", "model_max_length": 77}))
    built = LatentDiffusionPipeline.from_config(configs, seed=3)
    assert built.is_sdxl and built.tokenizer.pad_token == "<|endoftext|>" and built.tokenizer_2.pad_token == "!"
    assert built.text_encoder_2.config.projection_dim == pipe.text_encoder_2.config.projection_dim
    image = built("a red circle", num_inference_steps=2, seed=0, output_type="numpy", progress=False, **SIZE).images
    assert image.shape == (1, 32, 32, 3)


def test_prompt_embeds_with_pooled_embeds_match_diffusers(pipe, reference):
    """diffusers' own encode_prompt output fed to both pipelines gives the same images as the text; without negative
    embeddings a negative prompt is encoded, and an empty one is zeros in both (force_zeros_for_empty_prompt)."""
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = reference.encode_prompt(PROMPTS, device="cpu",
                                                                            negative_prompt=["blurry"] * 2)
    given = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    negatives = dict(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
    from_embeds = _ours(pipe, "ddim", None, None, **given, **negatives)
    assert (from_embeds - _theirs(reference, "ddim", None, **given, **negatives)).abs().max().item() < TOLERANCE
    assert (from_embeds - _ours(pipe, "ddim", "blurry")).abs().max().item() < 1e-5, "the same as from the text"
    encoded = _ours(pipe, "ddim", "blurry", None, **given)
    assert (encoded - from_embeds).abs().max().item() < 1e-5, "the negative prompt encoded instead"
    zeroed = _ours(pipe, "ddim", None, None, **given)
    assert (zeroed - _theirs(reference, "ddim", None, **given)).abs().max().item() < TOLERANCE
    assert (zeroed - from_embeds).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="SDXL needs pooled_prompt_embeds"):
        pipe(None, prompt_embeds=embeds, num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="SDXL needs negative_pooled_prompt_embeds"):
        pipe(None, prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
             num_inference_steps=1, progress=False)


def test_shipped_configs_are_sdxl_base_1_0():
    """Built on the meta device: the published parameter counts, and the sgm key names of real SDXL files."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from latentdiff.checkpoints import unet_keymap
    from latentdiff.checkpoints.single_file import SHIPPED_CONFIGS

    def config(name):
        return json.loads((SHIPPED_CONFIGS / "sdxl" / name / "config.json").read_text())

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config("unet"))
        models = (unet, AutoencoderKL.from_config(config("vae")),
                  CLIPTextModel(CLIPTextConfig.from_dict(config("text_encoder"))),
                  CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config("text_encoder_2"))))
    assert [sum(p.numel() for p in m.parameters()) for m in models] == [2567463684, 83653863, 123060480, 694659840]
    keys = unet_keymap(unet.config).to_original(unet.state_dict())
    assert len(keys) == 1680
    for key in ("label_emb.0.0.weight", "input_blocks.8.1.transformer_blocks.9.ff.net.2.weight",
                "middle_block.1.transformer_blocks.9.attn2.to_k.weight", "output_blocks.2.2.conv.weight"):
        assert "model.diffusion_model." + key in keys


def test_batch_script_runs_sdxl_at_its_native_size(sdxl_dir, pipe, tmp_path):
    from latentdiff.commands.generate import main
    from latentdiff.pngmeta import read_params

    out = tmp_path / "out"
    assert main(["--prompt", "a red circle", "--model", sdxl_dir, "--outdir", out, "--steps", "2", "--seed", "7",
                 "--precision", "fp32", "--no-progress", "--skip-grid"]) == 0
    (png,) = (out / "samples").glob("*.png")
    params = read_params(png)
    assert (params.model, params.width, params.height, params.seed) == ("tiny-sdxl", 64, 64, 7)
    image = pipe("a red circle", seed=7, num_inference_steps=2, output_type="numpy", progress=False).images[0]
    assert abs(np.asarray(Image.open(png)).astype(int) - image).max() <= 1
    # --from-png replays it from its parameters alone, bit for bit
    assert main(["--from-png", png, "--model", sdxl_dir, "--outdir", tmp_path / "replay", "--no-progress", "--skip-grid"]) == 0
    (replay,) = (tmp_path / "replay" / "samples").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(replay)), np.asarray(Image.open(png)))


def test_graph_replay_wrapper_carries_the_added_conditioning(pipe):
    """optimize.CUDAGraphUNet's static buffers hold text_embeds and time_ids too (on the CPU with the stand-in graph of
    test_device_policy): replay equals eager, and other size conditioning reaches a captured graph."""
    from test_device_policy import ReplayedEagerly

    from latentdiff.pipeline import EagerUNet

    def latents(**kwargs):
        return pipe(PROMPTS[0], seed=3, num_inference_steps=2, output_type="latents", progress=False, **SIZE,
                    **kwargs).images

    eager = latents()
    pipe.denoiser = ReplayedEagerly(pipe.unet)
    try:
        torch.testing.assert_close(latents(), eager, atol=0, rtol=0)
        resized = latents(original_size=(128, 128))
    finally:
        pipe.denoiser = EagerUNet(pipe.unet)
    torch.testing.assert_close(resized, latents(original_size=(128, 128)), atol=0, rtol=0)
    assert (resized - eager).abs().max() > 1e-3


def test_lora_on_unet_and_both_encoders_equals_diffusers(sdxl_dir, tmp_path):
    """A LoRA on the UNet, CLIP-L and bigG (diffusers' SDXL layout), at a scale, equals load_lora_weights +
    set_adapters; unloading gives the base model's images back."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    donor.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    for encoder in (donor.text_encoder, donor.text_encoder_2):
        encoder.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for model in (donor.unet, donor.text_encoder, donor.text_encoder_2):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5, generator=generator)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path, weight_name="style.safetensors", unet_lora_layers=get_peft_model_state_dict(donor.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(donor.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(donor.text_encoder_2))

    ours = load_pipeline(sdxl_dir, device="cpu", precision="fp32")
    base = _ours(ours, "euler")
    assert ours.load_lora(tmp_path / "style.safetensors", scale=0.7) == "style"
    assert all("style" in getattr(m, "peft_config", {}) for m in (ours.unet, ours.text_encoder, ours.text_encoder_2))
    theirs = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    theirs.load_lora_weights(str(tmp_path / "style.safetensors"), adapter_name="style")
    theirs.set_adapters(["style"], adapter_weights=[0.7])
    mine = _ours(ours, "euler")
    assert (mine - base).abs().max().item() > 0.05
    assert (mine - _theirs(theirs, "euler")).abs().max().item() < TOLERANCE
    ours.unload_lora("style")
    assert torch.equal(_ours(ours, "euler"), base)


def test_embedding_with_clip_l_and_clip_g_vectors_equals_diffusers(sdxl_dir, tmp_path):
    """An SDXL embedding (two vectors per encoder) in prompt and negative: equal to diffusers' load_textual_inversion
    into each tokenizer and encoder; an SD 1.x/2.x embedding is refused in one sentence."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file, save_file

    generator = torch.Generator().manual_seed(7)
    save_file({"clip_l": torch.randn(2, 32, generator=generator), "clip_g": torch.randn(2, 48, generator=generator)},
              tmp_path / "neonstyle.safetensors")
    ours = load_pipeline(sdxl_dir, device="cpu", precision="fp32")
    assert ours.load_embedding(tmp_path / "neonstyle.safetensors") == "neonstyle"
    theirs = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    vectors = load_file(tmp_path / "neonstyle.safetensors")
    for key, encoder, tokenizer in (("clip_l", theirs.text_encoder, theirs.tokenizer),
                                    ("clip_g", theirs.text_encoder_2, theirs.tokenizer_2)):
        theirs.load_textual_inversion(vectors[key], token="neonstyle", text_encoder=encoder, tokenizer=tokenizer)
    prompts = ["a neonstyle circle", "a green star"]
    mine = _ours(ours, "euler", ["neonstyle"] * 2, prompts=prompts)
    assert (mine - _ours(load_pipeline(sdxl_dir, device="cpu", precision="fp32"), "euler", ["neonstyle"] * 2,
                         prompts=prompts)).abs().max().item() > 0.01  # the vectors change the image
    assert (mine - _theirs(theirs, "euler", prompts=prompts, negative_prompt=["neonstyle"] * 2)).abs().max().item() < TOLERANCE
    save_file({"emb_params": torch.zeros(1, 32)}, tmp_path / "sd1.safetensors")
    with pytest.raises(ValueError, match="is an SD 1.x/2.x embedding; this model takes SDXL"):
        ours.load_embedding(tmp_path / "sd1.safetensors")
