"""The pipeline against diffusers' StableDiffusionPipeline on the same tiny random weights."""
import logging

import numpy as np
import pytest
import torch

from latentdiff.pipeline import LatentDiffusionPipeline, ModelError, load_pipeline
from latentdiff.schedulers import SAMPLERS

PROMPTS = ["a red circle on a blue background", "a green star on a white background"]
DIFFUSERS_SCHEDULERS = {
    "ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler",
}


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return load_pipeline(tiny_model_dir, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_matches_diffusers(pipe, reference, sampler, prediction_type):
    import diffusers

    pipe.schedule.prediction_type = prediction_type
    try:
        ours = pipe(PROMPTS, "blurry", num_inference_steps=6, guidance_scale=5.0, seed=[3, 4], sampler=sampler, output_type="pt", progress=False).images
    finally:
        pipe.schedule.prediction_type = "epsilon"
    cls = getattr(diffusers, DIFFUSERS_SCHEDULERS[sampler])
    reference.scheduler = cls.from_config({**reference.scheduler.config, "prediction_type": prediction_type})
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    theirs = reference(PROMPTS, negative_prompt=["blurry"] * 2, num_inference_steps=6, guidance_scale=5.0, generator=gens, output_type="pt").images
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    assert (ours - theirs).abs().max().item() < 1e-3


def test_image_independent_of_batch(pipe):
    """(prompt, seed) gives the same image alone, first, or second in a batch."""
    alone = pipe(PROMPTS[1], seed=7, num_inference_steps=4, output_type="pt", progress=False).images[0]
    batch = pipe([PROMPTS[1], PROMPTS[0], PROMPTS[1]], seed=[7, 8, 7], num_inference_steps=4, sampler="euler_ancestral", output_type="pt", progress=False).images
    batch_dpm = pipe([PROMPTS[0], PROMPTS[1]], seed=[8, 7], num_inference_steps=4, output_type="pt", progress=False).images
    torch.testing.assert_close(batch_dpm[1], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[0], batch[2], atol=1e-5, rtol=0)


def test_seeds_and_images_per_prompt(pipe):
    out = pipe(PROMPTS, num_images_per_prompt=2, seed=10, num_inference_steps=2, output_type="numpy", progress=False)
    assert out.seeds == [10, 11, 12, 13]
    assert out.images.shape == (4, 16, 16, 3) and out.images.dtype == np.uint8
    random = pipe(PROMPTS[0], num_inference_steps=1, progress=False)
    assert len(random.seeds) == 1 and 0 <= random.seeds[0] < 2**32
    again = pipe(PROMPTS[0], num_inference_steps=1, seed=random.seeds, output_type="numpy", progress=False).images[0]
    assert np.array_equal(np.asarray(random.images[0]), again)
    alone = pipe(PROMPTS[1], seed=13, num_inference_steps=2, output_type="numpy", progress=False).images[0]
    assert np.abs(out.images[3].astype(int) - alone).max() <= 1  # the images follow the seeds, not just the list


def test_guidance_one_skips_unconditional_pass(pipe):
    calls = []
    handle = pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        pipe(PROMPTS, guidance_scale=1.0, num_inference_steps=2, progress=False, output_type="latents")
        pipe(PROMPTS, guidance_scale=3.0, num_inference_steps=2, progress=False, output_type="latents")
    finally:
        handle.remove()
    assert calls == [2, 2, 4, 4]  # one UNet call per step: B without guidance, 2B (uncond + cond) with it


def test_callback_and_latents(pipe):
    seen = []
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = pipe("", latents=latents, num_inference_steps=3, callback=lambda i, t, x: seen.append((i, t, tuple(x.shape))), output_type="latents", progress=False)
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][2] == (1, 4, 8, 8)
    assert out.images.shape == (1, 4, 8, 8)
    # the given x_T is used, whatever the seed: the seed-0 draw gives the seed-0 image, other latents another one
    seeded = pipe("", seed=0, num_inference_steps=3, output_type="latents", progress=False).images
    torch.testing.assert_close(out.images, seeded)
    torch.testing.assert_close(pipe("", latents=latents, seed=123, num_inference_steps=3, output_type="latents", progress=False).images, seeded)
    other = pipe("", latents=-latents, seed=0, num_inference_steps=3, output_type="latents", progress=False).images
    assert (other - seeded).abs().max() > 0.1


def test_long_prompts_keep_every_word_and_mixed_lengths_do_not_couple_images(pipe, caplog):
    """Over 75 tokens the prompt goes on in a second chunk (A1111/ComfyUI), nothing is dropped or warned about; an
    image with a one-chunk prompt is the same alone or beside a two-chunk one (contexts are never padded to a
    batch mate's length)."""
    long = "a red circle " + "very " * 80 + "ELEPHANT"
    truncated = pipe.tokenizer.decode(pipe.tokenizer(long, truncation=True, max_length=77).input_ids[1:-1])
    with caplog.at_level(logging.WARNING):
        both = pipe([long, PROMPTS[0]], seed=[1, 2], num_inference_steps=2, output_type="pt", progress=False).images
    assert "dropped" not in caplog.text and "longer than" not in caplog.text.lower()
    cut = pipe(truncated, seed=1, num_inference_steps=2, output_type="pt", progress=False).images[0]
    assert (both[0] - cut).abs().max() > 1e-4, "the words after the first 75 tokens change the image"
    alone = pipe(PROMPTS[0], seed=2, num_inference_steps=2, output_type="pt", progress=False).images[0]
    torch.testing.assert_close(both[1], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=12), "multiples of 8 \\(in pixels\\), got width=16, height=12"),
    (dict(width=20), "multiples of 8 \\(in pixels\\), got width=20, height=16"),
    (dict(num_inference_steps=0), "at least 1"),
    (dict(sampler="plms"), "unknown sampler"),
    (dict(seed=[1, 2, 3]), "3 seeds for 1 images"),
    (dict(output_type="jpeg"), "output_type"),
])
def test_bad_arguments(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe("a cat", progress=False, **kwargs)


def test_nan_weights_are_reported(tiny_model_dir):
    broken = load_pipeline(tiny_model_dir, device="cpu", precision="fp32")
    with torch.no_grad():
        broken.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(ModelError, match="UNet"):
        broken("a cat", num_inference_steps=1, progress=False)


def test_nan_vae_decoder_is_reported_as_the_vae(tiny_model_dir):
    broken = load_pipeline(tiny_model_dir, device="cpu", precision="fp32")
    with torch.no_grad():
        broken.vae.decoder.conv_out.bias.fill_(float("nan"))
    assert torch.isfinite(broken("a cat", num_inference_steps=1, output_type="latents", progress=False).images).all()
    for output_type in ("pil", "pt"):
        with pytest.raises(ModelError, match="VAE decoder produced NaN"):
            broken("a cat", num_inference_steps=1, output_type=output_type, progress=False)


def test_bf16_close_to_fp32(tiny_model_dir, pipe):
    low = load_pipeline(tiny_model_dir, device="cpu", precision="bf16")
    assert low.unet.dtype == torch.bfloat16
    a = pipe(PROMPTS[0], seed=1, num_inference_steps=4, output_type="pt", progress=False).images
    b = low(PROMPTS[0], seed=1, num_inference_steps=4, output_type="pt", progress=False).images
    assert (a - b).abs().mean() < 0.05


def test_save_pretrained_round_trip_and_missing_paths(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "copy")
    copy = load_pipeline(tmp_path / "copy", device="cpu", precision="fp32")
    for a, b in zip(pipe.unet.state_dict().values(), copy.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert not (tmp_path / "copy.tmp").exists()
    with pytest.raises(ModelError, match="does not exist"):
        load_pipeline(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="unet/config.json is missing"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "empty")


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_in_original_layout_gives_the_same_images(tmp_path, pipe, tiny_model_dir, suffix):
    """An SD single file with CompVis key names (no latentdiff metadata) loads offline to the same model."""
    from safetensors.torch import load_file

    from latentdiff.checkpoints import save_single_file

    exported = tmp_path / "model.safetensors"
    save_single_file(exported, pipe.unet, pipe.vae, pipe.text_encoder, schedule=pipe.schedule)
    state = load_file(exported)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in state)
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in state)
    assert any(k.startswith("first_stage_model.decoder.") for k in state)
    plain = tmp_path / f"plain{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": state}, plain)
    else:
        from safetensors.torch import save_file

        save_file(state, plain)  # no metadata: the component configs must come from config_dir
    single = load_pipeline(plain, device="cpu", precision="fp32", config_dir=tiny_model_dir)
    a = pipe(PROMPTS, seed=5, num_inference_steps=3, output_type="pt", progress=False).images
    b = single(PROMPTS, seed=5, num_inference_steps=3, output_type="pt", progress=False).images
    assert torch.equal(a, b)


@pytest.mark.parametrize("precision, expected", [
    ("fp16", (torch.float16, torch.float16, torch.float32)),  # the SD VAE overflows in fp16: it stays float32
    ("bf16", (torch.bfloat16, torch.bfloat16, torch.bfloat16)),
    ("fp32", (torch.float32, torch.float32, torch.float32)),
])
def test_folder_and_single_file_loaders_follow_one_precision_policy(tmp_path, pipe, tiny_model_dir, precision, expected):
    from latentdiff.checkpoints import save_single_file

    single = tmp_path / "model.safetensors"
    save_single_file(single, pipe.unet, pipe.vae, pipe.text_encoder, schedule=pipe.schedule)
    for model in (tiny_model_dir, single):
        loaded = load_pipeline(model, device="cpu", precision=precision, optimize=False)
        assert (loaded.unet.dtype, loaded.text_encoder.dtype, loaded.vae.dtype) == expected, model


def _diffusers_image(reference, scheduler_cls: str, extra: dict | None = None, **kwargs):
    import diffusers

    plain = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "prediction_type": "epsilon"}  # shared: reset
    reference.scheduler = getattr(diffusers, scheduler_cls).from_config({**reference.scheduler.config, **plain, **(extra or {})})
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    return reference(generator=gens, num_inference_steps=6, guidance_scale=5.0, output_type="pt", **kwargs).images


@pytest.mark.parametrize("sampler, scheduler_cls, flag", [
    ("dpmpp_2m", "DPMSolverMultistepScheduler", "use_karras_sigmas"),
    ("euler", "EulerDiscreteScheduler", "use_karras_sigmas"),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", "use_exponential_sigmas"),
])
def test_karras_and_exponential_schedules_match_diffusers(pipe, reference, sampler, scheduler_cls, flag):
    name = "karras" if flag == "use_karras_sigmas" else "exponential"
    ours = pipe(PROMPTS, "blurry", num_inference_steps=6, guidance_scale=5.0, seed=[3, 4], sampler=sampler,
                scheduler=name, output_type="pt", progress=False).images
    theirs = _diffusers_image(reference, scheduler_cls, {flag: True}, prompt=PROMPTS, negative_prompt=["blurry"] * 2)
    assert (ours - theirs).abs().max().item() < 1e-3


def test_guidance_rescale_matches_diffusers(pipe, reference):
    ours = pipe(PROMPTS, num_inference_steps=6, guidance_scale=5.0, seed=[3, 4], sampler="ddim", guidance_rescale=0.7,
                output_type="pt", progress=False).images
    theirs = _diffusers_image(reference, "DDIMScheduler", prompt=PROMPTS, guidance_rescale=0.7)
    plain = pipe(PROMPTS, num_inference_steps=6, guidance_scale=5.0, seed=[3, 4], sampler="ddim", output_type="pt",
                 progress=False).images
    assert (ours - theirs).abs().max().item() < 1e-3 and (ours - plain).abs().max().item() > 1e-4


def test_clip_skip_and_prompt_embeds_match_diffusers_fed_the_same_embeddings(pipe, reference):
    """diffusers' clip_skip=k−1 is final_layer_norm(hidden_states[−k]); its own code path needs transformers 4, so the
    formula is fed to it as prompt_embeds."""
    from latentdiff import text

    with torch.no_grad():
        ids = text.tokenize(pipe.tokenizer, PROMPTS + ["", ""])
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        embeds = pipe.text_encoder.final_layer_norm(hidden)
    ours = pipe(PROMPTS, num_inference_steps=6, guidance_scale=5.0, seed=[3, 4], sampler="ddim", clip_skip=2,
                output_type="pt", progress=False).images
    theirs = _diffusers_image(reference, "DDIMScheduler", prompt_embeds=embeds[:2], negative_prompt_embeds=embeds[2:])
    assert (ours - theirs).abs().max().item() < 1e-3
    via_embeds = pipe(None, prompt_embeds=embeds[:2], negative_prompt_embeds=embeds[2:], num_inference_steps=6,
                      guidance_scale=5.0, seed=[3, 4], sampler="ddim", output_type="pt", progress=False).images
    torch.testing.assert_close(via_embeds, ours, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="pooled_prompt_embeds are SDXL's; this model takes prompt_embeds alone"):
        pipe(None, prompt_embeds=embeds[:2], pooled_prompt_embeds=embeds[:2, 0], num_inference_steps=1, progress=False)


def _guidance_switch(skipped: set[int], scale: float):
    """diffusers' documented dynamic-CFG callback, generalised: after step i, step i + 1 runs the conditional half of
    prompt_embeds at guidance 0 if it is in `skipped`, else the whole [uncond; cond] at `scale`."""
    full = {}

    def callback(pipeline, i, t, kwargs):
        full.setdefault("embeds", kwargs["prompt_embeds"])  # step 0 always runs guided here
        off = i + 1 in skipped
        pipeline._guidance_scale = 0.0 if off else scale
        kwargs["prompt_embeds"] = full["embeds"].chunk(2)[1] if off else full["embeds"]
        return kwargs

    return callback


@pytest.mark.parametrize("all_steps", [True, False])
def test_guidance_min_sigma_matches_diffusers_switching_guidance_off_in_a_step_callback(pipe, reference, all_steps):
    from latentdiff.schedulers import get_sampler

    sampler = get_sampler("ddim", pipe.schedule)
    sampler.set_timesteps(6)
    threshold = float(sampler.sigmas[0] + sampler.sigmas[1]) / 2  # every step but the first is below it
    skipped = {1, 2, 3, 4, 5} if all_steps else {1, 3, 5}
    ours = pipe(PROMPTS, "blurry", num_inference_steps=6, guidance_scale=5.0, seed=[3, 4], sampler="ddim",
                guidance_min_sigma=threshold, guidance_min_sigma_all_steps=all_steps, output_type="pt",
                progress=False).images
    theirs = _diffusers_image(reference, "DDIMScheduler", prompt=PROMPTS, negative_prompt=["blurry"] * 2,
                              callback_on_step_end=_guidance_switch(skipped, 5.0),
                              callback_on_step_end_tensor_inputs=["prompt_embeds"])
    guided = pipe(PROMPTS, "blurry", num_inference_steps=6, guidance_scale=5.0, seed=[3, 4], sampler="ddim",
                  output_type="pt", progress=False).images
    assert (ours - theirs).abs().max().item() < 1e-3 and (ours - guided).abs().max().item() > 1e-3


def test_guidance_min_sigma_skips_the_unconditional_rows(pipe):
    calls = []
    handle = pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        pipe(PROMPTS, guidance_scale=3.0, num_inference_steps=4, guidance_min_sigma=1e9,
             guidance_min_sigma_all_steps=False, progress=False, output_type="latents")
    finally:
        handle.remove()
    assert calls == [4, 2, 4, 2]  # every other step runs the 2 conditional rows alone


def test_a_models_own_guidance_min_sigma_is_its_default_and_saved_with_it(tiny_model_dir, tmp_path):
    import json
    import shutil

    from latentdiff.model_defaults import ModelDefaults

    folder = tmp_path / "with-defaults"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "latentdiff.json").write_text(json.dumps({"guidance_min_sigma": 5.0, "guidance_min_sigma_all_steps": True}))
    own = load_pipeline(folder, device="cpu", precision="fp32")
    plain = load_pipeline(tiny_model_dir, device="cpu", precision="fp32")
    assert own.defaults == ModelDefaults(5.0, True) and plain.defaults == ModelDefaults()
    run = dict(num_inference_steps=4, guidance_scale=5.0, seed=[1, 2], output_type="pt", progress=False)
    by_default = own(PROMPTS, **run).images
    torch.testing.assert_close(by_default, plain(PROMPTS, guidance_min_sigma=5.0, guidance_min_sigma_all_steps=True,
                                                 **run).images, atol=1e-5, rtol=0)
    torch.testing.assert_close(own(PROMPTS, guidance_min_sigma=0.0, **run).images, plain(PROMPTS, **run).images,
                               atol=1e-5, rtol=0)  # a call's own value wins
    assert (by_default - plain(PROMPTS, **run).images).abs().max().item() > 1e-3
    own.save_pretrained(tmp_path / "saved")
    plain.save_pretrained(tmp_path / "saved-plain")
    assert json.loads((tmp_path / "saved" / "latentdiff.json").read_text()) == {
        "guidance_min_sigma": 5.0, "guidance_min_sigma_all_steps": True}
    assert not (tmp_path / "saved-plain" / "latentdiff.json").exists()


def test_a_bad_model_defaults_file_stops_the_load_with_one_sentence(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "bad"  # the file's own checks: tests/test_model_defaults.py
    shutil.copytree(tiny_model_dir, folder)
    (folder / "latentdiff.json").write_text('{"guidance_min_sigma": -1}')
    with pytest.raises(ModelError, match="latentdiff.json is not a latentdiff model-defaults file .*must be a number ≥ 0"):
        load_pipeline(folder, device="cpu", precision="fp32")


@pytest.mark.parametrize("kwargs, named", [(dict(guidance_min_sigma=-0.5), "guidance_min_sigma must be a number ≥ 0"),
                                           (dict(guidance_min_sigma=float("nan")), "guidance_min_sigma must be"),
                                           (dict(guidance_min_sigma_all_steps="yes"), "must be true or false")])
def test_bad_guidance_min_sigma_is_refused(pipe, kwargs, named):
    with pytest.raises(ValueError, match=named):
        pipe(PROMPTS, num_inference_steps=1, progress=False, **kwargs)
