"""Image-to-image and inpainting against diffusers' Img2Img and Inpaint pipelines on the same tiny random weights."""
import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import images
from latentdiff.data.shapes import render
from latentdiff.pipeline import load_pipeline
from latentdiff.schedulers import SAMPLERS

PROMPTS = ["a red circle on a blue background", "a green star on a white background"]
DIFFUSERS_SCHEDULERS = {
    "ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler",
}
INIT = [render("yellow", "square", "purple", np.random.default_rng(i), size=16) for i in range(2)]
MASK = np.zeros((16, 16), np.uint8)
MASK[3:11, 5:13] = 255


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def diffusers_pipe(cls_name, folder, sampler):
    import diffusers

    ref = getattr(diffusers, cls_name).from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = getattr(diffusers, DIFFUSERS_SCHEDULERS[sampler]).from_config(ref.scheduler.config)
    return ref


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return load_pipeline(tiny_model_dir, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def pipe9(tiny_inpaint_model_dir):
    return load_pipeline(tiny_inpaint_model_dir, device="cpu", precision="fp32")


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_img2img_matches_diffusers(pipe, tiny_model_dir, sampler):
    """Same init latents (posterior sample), noise and sampler: the same images as StableDiffusionImg2ImgPipeline."""
    ours = pipe(PROMPTS, "blurry", image=INIT, strength=0.6, num_inference_steps=6, guidance_scale=5.0, seed=[3, 4],
                sampler=sampler, output_type="pt", progress=False).images
    ref = diffusers_pipe("StableDiffusionImg2ImgPipeline", tiny_model_dir, sampler)
    theirs = ref(PROMPTS, image=INIT, negative_prompt=["blurry"] * 2, strength=0.6, num_inference_steps=6,
                 guidance_scale=5.0, generator=gens(3, 4), output_type="pt").images
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("strength", [1.0, 0.7])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("unet", ["9-channel", "regular"])
def test_inpainting_matches_diffusers(pipe, pipe9, tiny_model_dir, tiny_inpaint_model_dir, unet, sampler, strength):
    """9 channels: the mask and masked-image latents joined to the UNet's input; a regular UNet: the kept region
    re-noised and blended in every step. Latents as StableDiffusionInpaintPipeline's, and so are the pixels once the
    original is pasted back outside the mask (mask_blur=0: diffusers has no feather)."""
    ours_pipe, folder = (pipe9, tiny_inpaint_model_dir) if unet == "9-channel" else (pipe, tiny_model_dir)
    mask = Image.fromarray(MASK)
    kwargs = dict(num_inference_steps=6, guidance_scale=5.0, strength=strength)
    ref = diffusers_pipe("StableDiffusionInpaintPipeline", folder, sampler)
    latents = ours_pipe(PROMPTS, "blurry", image=INIT, mask_image=mask, mask_blur=0, seed=[3, 4], sampler=sampler,
                        output_type="latents", progress=False, **kwargs).images
    theirs = ref(PROMPTS, image=INIT, mask_image=mask, negative_prompt=["blurry"] * 2, generator=gens(3, 4),
                 output_type="latent", **kwargs).images
    assert (latents - theirs).abs().max().item() < 5e-4
    ours = ours_pipe(PROMPTS, "blurry", image=INIT, mask_image=mask, mask_blur=0, seed=[3, 4], sampler=sampler,
                     output_type="pt", progress=False, **kwargs).images
    theirs = ref(PROMPTS, image=INIT, mask_image=mask, negative_prompt=["blurry"] * 2, generator=gens(3, 4),
                 output_type="pt", **kwargs).images
    m = torch.from_numpy(MASK / 255.0).float()
    original = torch.stack([images.to_tensor(x, "image", gray=False, size=(16, 16)) for x in INIT])
    assert (ours - images.paste_back(theirs, original, m)).abs().max().item() < 1e-4


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_regular_unet_inpainting_keeps_every_pixel_outside_the_feathered_mask(pipe, sampler):
    blur, picture, mask = 2.0, render("red", "circle", "blue", np.random.default_rng(0), size=32), np.zeros((32, 32), np.uint8)
    mask[8:20, 10:22] = 255
    out = pipe(PROMPTS[1], image=picture, mask_image=mask, mask_blur=blur, seed=1, sampler=sampler,
               num_inference_steps=4, output_type="numpy", progress=False).images[0]
    feathered = images.feather(torch.from_numpy(mask / 255.0).float()[None, None], blur)[0, 0].numpy()
    kept = feathered == 0
    assert 0.4 < kept.mean() < 0.8  # the feather (radius 5 px) widens the mask, and the rest is kept
    original = np.asarray(picture)
    assert np.array_equal(out[kept], original[kept])
    assert np.abs(out[mask > 0].astype(int) - original[mask > 0]).mean() > 5  # repainted inside


def test_strength_runs_the_last_int_steps_times_strength_steps(pipe):
    """diffusers' count: int(10 · 0.75) = 7 steps, the last seven of the 10-step schedule."""
    seen = []
    pipe(PROMPTS[0], image=INIT[0], strength=0.75, num_inference_steps=10, seed=0, sampler="ddim", output_type="latents",
         callback=lambda i, t, x: seen.append((i, t)), progress=False)
    assert [i for i, _ in seen] == list(range(3, 10))
    assert [t for _, t in seen] == [601, 501, 401, 301, 201, 101, 1]  # DDIM on SD's leading spacing, steps_offset 1


def test_inputs_as_pil_arrays_and_tensors_agree_and_sizes_come_from_the_image(pipe):
    common = dict(strength=0.5, num_inference_steps=4, seed=2, output_type="pt", progress=False)
    from_pil = pipe(PROMPTS[0], image=INIT[0], **common).images
    from_array = pipe(PROMPTS[0], image=np.asarray(INIT[0]), **common).images
    as_tensor = torch.from_numpy(np.asarray(INIT[0])).permute(2, 0, 1) / 255.0
    from_tensor = pipe(PROMPTS[0], image=as_tensor, **common).images
    assert torch.equal(from_pil, from_array) and (from_pil - from_tensor).abs().max() < 1e-6
    # a non-RGB picture is converted: RGBA drops alpha, 16-bit grayscale is scaled, not clipped
    rgba = INIT[0].convert("RGBA")
    assert torch.equal(pipe(PROMPTS[0], image=rgba, **common).images, from_pil)
    gray16 = Image.fromarray((np.asarray(INIT[0].convert("L")).astype(np.uint16) * 257))
    gray8 = INIT[0].convert("L")
    assert torch.equal(pipe(PROMPTS[0], image=gray16, **common).images, pipe(PROMPTS[0], image=gray8, **common).images)
    # size: the image's, rounded down to multiples of 8; an explicit size resizes it
    odd = INIT[0].resize((21, 19))
    assert pipe(PROMPTS[0], image=odd, **common).images.shape == (1, 3, 16, 16)
    assert pipe(PROMPTS[0], image=odd, height=24, width=32, **common).images.shape == (1, 3, 24, 32)


def test_one_image_per_prompt_and_independent_of_the_batch(pipe):
    common = dict(strength=0.8, num_inference_steps=4, sampler="euler_ancestral", output_type="pt", progress=False)
    batch = pipe(PROMPTS, image=INIT, mask_image=[Image.fromarray(MASK)] * 2, num_images_per_prompt=2,
                 seed=[5, 6, 7, 8], **common).images
    alone = pipe(PROMPTS[1], image=INIT[1], mask_image=Image.fromarray(MASK), seed=8, **common).images
    assert batch.shape == (4, 3, 16, 16)
    torch.testing.assert_close(batch[3:], alone, atol=1e-5, rtol=0)


def test_all_black_mask_returns_the_picture_and_all_white_repaints_it(pipe):
    common = dict(num_inference_steps=3, seed=0, output_type="numpy", progress=False)
    black = pipe(PROMPTS[0], image=INIT[0], mask_image=np.zeros((16, 16), np.uint8), **common).images[0]
    assert np.array_equal(black, np.asarray(INIT[0]))
    white = pipe(PROMPTS[0], image=INIT[0], mask_image=np.full((16, 16), 255, np.uint8), **common).images[0]
    assert not np.array_equal(white, np.asarray(INIT[0]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(strength=0), "strength must be a number in (0, 1]"),
    (dict(strength=1.5), "strength must be a number in (0, 1]"),
    (dict(strength="0.5"), "strength must be a number in (0, 1]"),
    (dict(strength=0.1), "strength 0.1 runs int(4 × 0.1) = 0 of the 4 steps"),
    (dict(image=None, strength=0.5), "strength needs an init image"),
    (dict(image=None, mask_image=MASK), "mask_image needs an init image"),
    (dict(mask_blur=2), "mask_blur feathers an inpainting mask; pass mask_image="),
    (dict(mask_image=MASK[:8], mask_blur=0), "mask_image is 16x8 but its image is 16x16"),
    (dict(mask_image=MASK, mask_blur=-1), "mask_blur must be a number of pixels of at least 0"),
    (dict(image=[INIT[0]] * 3), "got 3 images for 1 prompts"),
    (dict(image="init.png"), "image must be a PIL image, a uint8 array, a float tensor"),
    (dict(image=np.zeros((16, 16, 3), np.float32)), "image as an array must be uint8"),
    (dict(image=torch.full((3, 16, 16), 2.0)), "image as a float tensor must hold values in [0, 1]"),
    (dict(image=torch.zeros(16, 16, 3)), "image as a tensor must be (3, H, W)"),
    (dict(latents=torch.zeros(1, 4, 4, 4)), "latents (the initial noise) must have shape (1, 4, 8, 8)"),
])
def test_api_refuses_bad_image_arguments_in_one_sentence(pipe, kwargs, message):
    kwargs = {"image": INIT[0], **kwargs}
    with pytest.raises(ValueError) as info:
        pipe(PROMPTS[0], num_inference_steps=4, progress=False, **kwargs)
    assert message in str(info.value)


def test_inpainting_unet_asks_for_a_mask(pipe9):
    with pytest.raises(ValueError, match="inpainting UNet .*pass image= and mask_image="):
        pipe9(PROMPTS[0], num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="inpainting UNet"):
        pipe9(PROMPTS[0], image=INIT[0], num_inference_steps=2, progress=False)


def test_feather_is_a_finite_gaussian():
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 12:20, 12:20] = 1
    soft = images.feather(mask, 2.0)  # radius int(2.5·2 + 0.5) = 5 px
    assert torch.equal(images.feather(mask, 0), mask)
    assert soft[..., 7:25, 7:25].sum() == pytest.approx(64, abs=1e-3)  # mass preserved
    assert soft[..., :7, :].max() == 0 and soft[..., 25:, :].max() == 0  # exactly zero beyond the radius
    assert 0 < soft[0, 0, 7, 16] < 0.01 and soft[0, 0, 16, 16] > 0.9


def test_nine_channel_single_file_loads_from_its_weights(tmp_path, pipe9, tiny_model_dir):
    """An SD-layout single file of an inpainting UNet: in_channels comes from input_blocks.0.0.weight, (C, 9, 3, 3),
    even when the configs given with it say 4."""
    from safetensors.torch import load_file, save_file

    from latentdiff.checkpoints import load_single_file, save_single_file

    exported = tmp_path / "inpainting.safetensors"
    save_single_file(exported, pipe9.unet, pipe9.vae, pipe9.text_encoder, schedule=pipe9.schedule)
    state = load_file(exported)
    assert state["model.diffusion_model.input_blocks.0.0.weight"].shape == (32, 9, 3, 3)
    plain = tmp_path / "plain.safetensors"
    save_file(state, plain)  # no metadata; the 4-channel model's configs
    parts = load_single_file(plain, config_dir=tiny_model_dir)
    assert parts["unet"].config.in_channels == 9
    single = load_pipeline(plain, device="cpu", precision="fp32", config_dir=tiny_model_dir)
    common = dict(image=INIT[0], mask_image=MASK, seed=1, num_inference_steps=3, output_type="pt", progress=False)
    assert torch.equal(single(PROMPTS[0], **common).images, pipe9(PROMPTS[0], **common).images)


def test_full_size_inpainting_layout_is_named():
    """sd-1.5-inpainting's UNet (the shipped SD 1.5 config with 9 input channels), on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from latentdiff.checkpoints import unet_keymap
    from latentdiff.checkpoints.single_file import SHIPPED_CONFIGS, _unet_in_channels, _version

    config = {**UNet2DConditionModel.load_config(SHIPPED_CONFIGS / "sd1" / "unet"), "in_channels": 9}
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    state = unet_keymap(unet.config).to_original(unet.state_dict())
    assert state["model.diffusion_model.input_blocks.0.0.weight"].shape == (320, 9, 3, 3)
    assert _unet_in_channels(state, {"in_channels": 4}) == 9
    assert _version("sd1", config) == "sd1-inpainting" and _version("sd1", {**config, "in_channels": 4}) == "sd1"
