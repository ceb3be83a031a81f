"""Per-image seeds inside batches (API and batch script, before and after a kill/rerun), --from-png replay of every
field and every A1111 sampler name, and bad input that must be refused with its own sentence."""
import shutil

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from latentdiff.pngmeta import GenerationParams, read_params


def generate(*args) -> int:
    """The batch script (`latentdiff generate PROMPT [options]`), in-process: the only place naming its entry point."""
    from latentdiff.cli import main

    return main(["generate", *map(str, args)])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def assert_same_image(a: np.ndarray, b: np.ndarray, what: str = "") -> None:
    """Equal up to one grey level (batched and single convolutions may round differently; a wrong seed is far off)."""
    assert a.shape == b.shape, what
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1, what


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    from latentdiff.pipeline import load_pipeline

    return load_pipeline(tiny_model_dir, device="cpu", precision="fp32")


def api_image(pipe, params: GenerationParams) -> np.ndarray:
    """The image the API makes for a PNG's claimed parameters, alone (batch of one)."""
    eta = float(params.extra.get("Eta", 0))
    return pipe(params.prompt, params.negative_prompt, seed=params.seed, num_inference_steps=params.steps,
                guidance_scale=params.cfg_scale, sampler=params.sampler, eta=eta, width=params.width,
                height=params.height, output_type="numpy", progress=False).images[0]


# ----------------------------------------------------------------------------------------- seeds in the API

PROMPTS = ["a red circle on a blue background", "a green star on a white background"]


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral"])  # ancestral: per-image noise at every step too
def test_api_image_k_of_a_batch_equals_its_seed_alone(pipe, sampler):
    common = dict(num_inference_steps=3, guidance_scale=3.0, sampler=sampler, output_type="numpy", progress=False)
    out = pipe(PROMPTS, "blurry", num_images_per_prompt=2, seed=50, **common)
    assert out.seeds == [50, 51, 52, 53]
    for k, (prompt, seed) in enumerate(zip([PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, out.seeds)):
        assert_same_image(out.images[k], pipe(prompt, "blurry", seed=seed, **common).images[0], f"image {k}")
    listed = pipe(PROMPTS, "blurry", seed=[9, 4], **common).images  # an explicit, non-consecutive seed list
    for k, (prompt, seed) in enumerate(zip(PROMPTS, [9, 4])):
        assert_same_image(listed[k], pipe(prompt, "blurry", seed=seed, **common).images[0], f"listed image {k}")
    assert np.abs(out.images[0].astype(int) - out.images[1].astype(int)).max() > 10  # the seeds do differ


# ----------------------------------------------------------------------------------------- seeds in the script


def test_script_seeds_each_image_of_a_batch_alone_before_and_after_a_rerun(tiny_model_dir, pipe, tmp_path):
    """Two prompts × 2 batches × 2 images; 3 PNGs deleted non-contiguously (a kill), so the rerun batches
    images 1 and 4 together (different prompts, non-consecutive seeds) and 6 alone. Every image must equal the
    uninterrupted run's and the API's image for the seed its PNG claims."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = ["--from-file", prompts, "--model", tiny_model_dir, "--n-samples", "2", "--n-iter", "2", "--steps", "2",
            "--scale", "3", "--sampler", "euler_ancestral", "--seed", "100", "--negative-prompt", "blurry",
            "--precision", "fp32", "--skip-grid", "--no-progress"]
    whole, rerun = tmp_path / "whole", tmp_path / "rerun"
    assert generate(*args, "--outdir", whole) == 0
    names = [f"{k:05d}.png" for k in range(8)]
    assert sorted(p.name for p in (whole / "samples").iterdir()) == names
    shutil.copytree(whole, rerun)
    deleted = ["00001.png", "00004.png", "00006.png"]
    for name in deleted:
        (rerun / "samples" / name).unlink()
    kept = {name: (rerun / "samples" / name).stat().st_mtime_ns for name in names if name not in deleted}
    assert generate(*args, "--outdir", rerun) == 0

    assert sorted(p.name for p in (rerun / "samples").iterdir()) == names
    for name, mtime in kept.items():
        assert (rerun / "samples" / name).stat().st_mtime_ns == mtime, "finished images are never rewritten"
    for k, name in enumerate(names):
        params = read_params(rerun / "samples" / name)
        assert params == read_params(whole / "samples" / name)
        assert (params.prompt, params.seed) == (PROMPTS[k // 4], 100 + k)
        image = pixels(rerun / "samples" / name)
        assert_same_image(image, pixels(whole / "samples" / name), f"{name}: rerun vs uninterrupted run")
        assert_same_image(image, api_image(pipe, params), f"{name}: script vs API with the PNG's seed alone")


# ----------------------------------------------------------------------------------------- --from-png


@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])  # fp32 or bf16 is never what `auto` picks
def test_from_png_restores_every_field_at_non_default_values(tiny_model_dir, tmp_path, precision):
    import torch

    from latentdiff.precision import precision_name, resolve_dtype

    resolved = precision_name(resolve_dtype(precision, torch.device("cpu")))  # what the PNG must name
    source_dir, replay_dir = tmp_path / "source", tmp_path / "replay"
    assert generate("a blue square, at dusk: wide", "--negative-prompt", "blurry, low quality", "--model", tiny_model_dir,
                    "--steps", "3", "--sampler", "ddim", "--eta", "0.5", "--scale", "3.5", "--seed", "1234",
                    "--W", "24", "--H", "16", "--precision", precision, "--outdir", source_dir, "--skip-grid",
                    "--no-progress") == 0
    source = source_dir / "samples" / "00000.png"
    written = read_params(source)
    assert (written.prompt, written.negative_prompt, written.steps, written.sampler, written.cfg_scale, written.seed,
            written.width, written.height) == ("a blue square, at dusk: wide", "blurry, low quality", 3, "ddim", 3.5,
                                               1234, 24, 16)
    assert written.extra["Precision"] == resolved and float(written.extra["Eta"]) == 0.5
    assert pixels(source).shape == (16, 24, 3)

    assert generate("--from-png", source, "--model", tiny_model_dir, "--outdir", replay_dir, "--no-progress") == 0
    replay = replay_dir / "samples" / "00000.png"
    assert read_params(replay) == written
    assert np.array_equal(pixels(replay), pixels(source))
    # a replay into a folder that holds another job's image is the next image there, not an overwrite
    assert generate("another job", "--model", tiny_model_dir, "--outdir", replay_dir, "--steps", "2", "--skip-grid",
                    "--no-progress") == 0
    replay.unlink()  # the replay job's own image, gone: its rerun makes it again in its own place
    assert generate("--from-png", source, "--model", tiny_model_dir, "--outdir", replay_dir, "--skip-grid", "--no-progress") == 0
    assert np.array_equal(pixels(replay), pixels(source))
    assert read_params(replay_dir / "samples" / "00001.png").prompt == "another job"


A1111_SAMPLERS = {"DDIM": "ddim", "DDPM": "ddpm", "DPM++ 2M": "dpmpp_2m", "Euler": "euler", "Euler a": "euler_ancestral"}


@pytest.mark.parametrize("a1111_name", sorted(A1111_SAMPLERS))
def test_from_png_maps_every_a1111_sampler_name(tiny_model_dir, pipe, tmp_path, a1111_name):
    """A PNG written by A1111 (its sampler display name) replays as the image of the matching latentdiff sampler."""
    native = GenerationParams("a yellow star", "dark", steps=3, sampler=A1111_SAMPLERS[a1111_name], cfg_scale=4.0,
                              seed=77, width=16, height=24, model="tiny-sd", extra={"Precision": "fp32"})
    expected = api_image(pipe, native)
    text = native.to_text().replace(f"Sampler: {native.sampler},", f"Sampler: {a1111_name},")
    assert f"Sampler: {a1111_name}," in text
    info = PngInfo()
    info.add_text("parameters", text)
    Image.fromarray(expected).save(tmp_path / "a1111.png", pnginfo=info)

    assert generate("--from-png", tmp_path / "a1111.png", "--model", tiny_model_dir, "--outdir", tmp_path / "out",
                    "--no-progress") == 0
    replay = tmp_path / "out" / "samples" / "00000.png"
    assert read_params(replay).sampler == A1111_SAMPLERS[a1111_name]
    assert np.array_equal(pixels(replay), expected)


def _plain_png(path):
    Image.new("RGB", (16, 16), "white").save(path)


def _png_with_text(text):
    def make(path):
        info = PngInfo()
        info.add_text("parameters", text)
        Image.new("RGB", (16, 16), "white").save(path, pnginfo=info)
    return make


@pytest.mark.parametrize("make, reason", [
    (_plain_png, "no 'parameters' text chunk"),
    (_png_with_text("just a caption, no parameters line"), "no 'Steps: …' line"),
    (_png_with_text("a cat\nSteps: many, Sampler: Euler, Size: bigxsmall"), "invalid literal"),
    (_png_with_text("a cat\nSteps: 3, Sampler: Euler, Size: 16x16, Eta: lots"), "could not convert"),
    (lambda path: path.write_bytes(b"not an image at all"), "cannot identify image file"),
])
def test_from_png_without_parameters_is_one_sentence_and_exit_2(tiny_model_dir, tmp_path, capsys, make, reason):
    make(tmp_path / "source.png")
    rc = generate("--from-png", tmp_path / "source.png", "--model", tiny_model_dir, "--outdir", tmp_path / "out")
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"--from-png {tmp_path / 'source.png'}" in err and reason in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("flag, value", [("--W", 20), ("--H", 20), ("--W", 0), ("--W", -8)])
def test_script_refuses_a_size_not_a_positive_multiple_of_8(tmp_path, capsys, flag, value):
    rc = generate("x", flag, value, "--outdir", tmp_path / "out")
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.endswith(f"{flag} must be a positive multiple of 8, got {value}") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size, named", [(dict(width=20), "width=20, height=16"), (dict(height=20), "width=16, height=20"),
                                         (dict(width=-8), "width=-8, height=16")])
def test_api_refuses_a_size_not_a_positive_multiple_of_8(pipe, size, named):
    with pytest.raises(ValueError, match=f"height and width must be positive multiples of 8 \\(in pixels\\), got {named}"):
        pipe("a cat", num_inference_steps=1, progress=False, **size)


def test_schedule_clip_skip_and_rescale_are_written_in_a1111_names_and_replayed(tiny_model_dir, tmp_path, caplog):
    source_dir = tmp_path / "source"
    assert generate("a (red:1.3) cat", "--model", tiny_model_dir, "--steps", "3", "--sampler", "dpmpp_2m",
                    "--scheduler", "karras", "--clip-skip", "2", "--guidance-rescale", "0.5", "--outdir", source_dir,
                    "--precision", "fp32", "--skip-grid", "--no-progress") == 0
    source = source_dir / "samples" / "00000.png"
    text = Image.open(source).info["parameters"]
    assert "Sampler: DPM++ 2M, " in text and "Schedule type: Karras" in text and "Clip skip: 2" in text
    assert "Guidance rescale: 0.5" in text
    assert generate("--from-png", source, "--model", tiny_model_dir, "--outdir", tmp_path / "replay", "--no-progress") == 0
    assert np.array_equal(pixels(tmp_path / "replay" / "samples" / "00000.png"), pixels(source))
    # A1111's old combined name carries the schedule; fields latentdiff cannot honour are named, not dropped
    old_style = tmp_path / "a1111.png"
    info = PngInfo()
    info.add_text("parameters", text.replace("Sampler: DPM++ 2M, ", "Sampler: DPM++ 2M Karras, ")
                  .replace(", Schedule type: Karras", "") + ", Hires upscale: 2, Model hash: 0123456789")
    Image.open(source).save(old_style, pnginfo=info)
    with caplog.at_level("WARNING"):
        assert generate("--from-png", old_style, "--model", tiny_model_dir, "--outdir", tmp_path / "old",
                        "--no-progress") == 0
    assert np.array_equal(pixels(tmp_path / "old" / "samples" / "00000.png"), pixels(source))
    assert "cannot honour Hires upscale" in caplog.text and "model hash 0123456789" in caplog.text


def test_flags_given_with_from_png_replace_the_pngs_settings(tiny_model_dir, tmp_path, caplog):
    assert generate("a cat", "--model", tiny_model_dir, "--steps", "3", "--seed", "5", "--outdir", tmp_path / "a",
                    "--precision", "fp32", "--skip-grid", "--no-progress") == 0
    source = tmp_path / "a" / "samples" / "00000.png"
    with caplog.at_level("WARNING"):
        assert generate("--from-png", source, "--model", tiny_model_dir, "--steps", "2", "--outdir", tmp_path / "b",
                        "--no-progress") == 0
    replay = read_params(tmp_path / "b" / "samples" / "00000.png")
    assert (replay.steps, replay.seed, replay.prompt) == (2, 5, "a cat")  # steps yours, the rest the PNG's
    assert "your --steps replace the PNG's" in caplog.text
    assert generate("a cat", "--model", tiny_model_dir, "--steps", "2", "--seed", "5", "--outdir", tmp_path / "c",
                    "--precision", "fp32", "--skip-grid", "--no-progress") == 0
    assert np.array_equal(pixels(tmp_path / "b" / "samples" / "00000.png"), pixels(tmp_path / "c" / "samples" / "00000.png"))


def test_ngms_is_written_in_a1111_names_and_replayed_whatever_the_models_own(tiny_model_dir, tmp_path, capsys):
    import json

    own = tmp_path / "own-ngms"  # a model that recommends NGMS 5 on every step
    shutil.copytree(tiny_model_dir, own)
    (own / "latentdiff.json").write_text(json.dumps({"guidance_min_sigma": 5.0, "guidance_min_sigma_all_steps": True}))
    run = ("--steps", "3", "--precision", "fp32", "--skip-grid", "--no-progress")
    assert generate("a cat", "--model", own, "--outdir", tmp_path / "own", *run) == 0
    assert generate("a cat", "--model", tiny_model_dir, "--outdir", tmp_path / "plain", *run) == 0
    with_ngms, without = tmp_path / "own" / "samples" / "00000.png", tmp_path / "plain" / "samples" / "00000.png"
    assert "NGMS: 5, NGMS all steps: True" in Image.open(with_ngms).info["parameters"]
    assert "NGMS" not in Image.open(without).info["parameters"]
    assert np.abs(pixels(with_ngms).astype(int) - pixels(without)).max() > 2
    # each replays on the other model: the PNG's NGMS (or its absence: off) wins over the model's own
    assert generate("--from-png", with_ngms, "--model", tiny_model_dir, "--outdir", tmp_path / "r1", "--no-progress") == 0
    assert generate("--from-png", without, "--model", own, "--outdir", tmp_path / "r2", "--no-progress") == 0
    assert np.array_equal(pixels(tmp_path / "r1" / "samples" / "00000.png"), pixels(with_ngms))
    assert np.array_equal(pixels(tmp_path / "r2" / "samples" / "00000.png"), pixels(without))
    # the flags give it on any model
    assert generate("a cat", "--model", tiny_model_dir, "--guidance-min-sigma", "5", "--guidance-min-sigma-all-steps",
                    "--outdir", tmp_path / "flags", *run) == 0
    assert np.array_equal(pixels(tmp_path / "flags" / "samples" / "00000.png"), pixels(with_ngms))
    capsys.readouterr()
    assert generate("a cat", "--model", tiny_model_dir, "--guidance-min-sigma", "-1", "--outdir", tmp_path / "bad", *run) == 2
    assert "--guidance-min-sigma must be a noise level ≥ 0 (0 = off), got -1.0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
