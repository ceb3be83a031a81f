"""The batch script's --init-image, --strength, --mask and --mask-blur: files, metadata, replay, bad input."""
import json

import numpy as np
import pytest
from PIL import Image

from latentdiff.commands.generate import main
from latentdiff.commands.outdir import MANIFEST
from latentdiff.data.shapes import render
from latentdiff.pngmeta import GenerationParams, read_params, save_png


def generate(model, outdir, *args):
    return main(["--model", model, "--outdir", outdir, "--steps", "4", "--precision", "fp32", "--no-progress", *args])


def pixels(path):
    return np.asarray(Image.open(path))


@pytest.fixture
def pictures(tmp_path):
    """A 20x20 init image (sizes default to 16x16: rounded down to multiples of 8) and its mask."""
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    render("red", "circle", "blue", np.random.default_rng(0), size=20).save(init)
    m = np.zeros((20, 20), np.uint8)
    m[4:14, 6:16] = 255
    Image.fromarray(m).save(mask)
    return init, mask


@pytest.mark.parametrize("inpaint", [False, True])
def test_png_records_strength_and_mask_blur_and_from_png_replays_bit_for_bit(tiny_model_dir, tmp_path, pictures, inpaint):
    init, mask = pictures
    extra = ["--mask", mask, "--mask-blur", "1.5"] if inpaint else []
    assert generate(tiny_model_dir, tmp_path / "a", "--prompt", "a green star", "--init-image", init, "--strength", "0.8",
                    "--sampler", "euler_ancestral", "--seed", "7", "--skip-grid", *extra) == 0
    original = tmp_path / "a" / "samples" / "00000.png"
    params = read_params(original)
    assert (params.width, params.height, params.seed) == (16, 16, 7)
    assert params.extra["Denoising strength"] == "0.8"
    assert params.extra.get("Mask blur") == ("1.5" if inpaint else None)
    spec = json.loads((tmp_path / "a" / MANIFEST).read_text())["spec"]
    assert spec["strength"] == 0.8 and spec["init_images"][0]["path"] == str(init.resolve())
    assert ("masks" in spec) == inpaint

    replay = ["--from-png", original, "--model", tiny_model_dir, "--outdir", tmp_path / "b", "--no-progress"]
    assert main([*replay, "--init-image", init, *extra[:2]]) == 0
    again = tmp_path / "b" / "samples" / "00000.png"
    assert np.array_equal(pixels(again), pixels(original)) and read_params(again) == params


def test_inpainting_keeps_the_init_image_outside_the_feathered_mask(tiny_model_dir, tmp_path, pictures):
    """With --H/--W equal to the init image's size nothing is resized, so kept pixels are the file's exactly."""
    init, mask = pictures
    big = tmp_path / "big.png"
    Image.open(init).resize((24, 24)).save(big)
    Image.open(mask).resize((24, 24), Image.Resampling.NEAREST).save(tmp_path / "bigmask.png")
    assert generate(tiny_model_dir, tmp_path / "out", "--prompt", "a cat", "--init-image", big,
                    "--mask", tmp_path / "bigmask.png", "--mask-blur", "0", "--skip-grid") == 0
    out = pixels(tmp_path / "out" / "samples" / "00000.png")
    kept = pixels(tmp_path / "bigmask.png") == 0
    assert out.shape == (24, 24, 3) and np.array_equal(out[kept], pixels(big)[kept])


def test_a_folder_of_init_images_is_taken_in_name_order(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "inits"
    folder.mkdir()
    for name, color in (("b.png", "green"), ("a.png", "red"), ("c.png", "white")):
        render(color, "square", "black", np.random.default_rng(1), size=16).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    Image.open(folder / "c.png").convert("L").save(folder / "c.png")  # a grayscale picture: converted, with a note
    assert generate(tiny_model_dir, tmp_path / "out", "--prompt", "a circle", "--init-image", folder, "--n-iter", "2") == 0
    assert "note: init image" in capsys.readouterr().err
    files = sorted((tmp_path / "out" / "samples").glob("*.png"))
    assert len(files) == 6 and [read_params(f).seed for f in files] == list(range(42, 48))
    spec = json.loads((tmp_path / "out" / MANIFEST).read_text())["spec"]
    assert [entry["path"].rsplit("/", 1)[1] for entry in spec["init_images"]] == ["a.png", "b.png", "c.png"]
    # one prompt per picture, in order
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na green star\na blue square\n")
    assert generate(tiny_model_dir, tmp_path / "paired", "--from-file", prompts, "--init-image", folder, "--skip-grid") == 0
    assert [read_params(f).prompt for f in sorted((tmp_path / "paired" / "samples").glob("*.png"))] == \
        ["a red circle", "a green star", "a blue square"]


@pytest.mark.parametrize("args, message", [
    (["--init-image", "{init}", "--strength", "0"], "--strength must be a number in (0, 1]"),
    (["--init-image", "{init}", "--strength", "1.5"], "--strength must be a number in (0, 1]"),
    (["--init-image", "{init}", "--strength", "0.1"], "--strength 0.1 runs int(4 × 0.1) = 0 of the 4 steps; raise --strength or --steps"),
    (["--init-image", "{tmp}/missing.png"], "--init-image {tmp}/missing.png does not exist"),
    (["--init-image", "{tmp}/corrupt.png"], "cannot read --init-image {tmp}/corrupt.png"),
    (["--init-image", "{tmp}/empty"], "--init-image folder {tmp}/empty has no images"),
    (["--init-image", "{init}", "--mask", "{tmp}/missing.png"], "--mask {tmp}/missing.png does not exist"),
    (["--init-image", "{init}", "--mask", "{tmp}/small.png"], "mask {tmp}/small.png is 8x8 but init image {init} is 20x20"),
    (["--init-image", "{init}", "--mask", "{mask}", "--mask-blur", "-1"], "--mask-blur must be a number of pixels of at least 0"),
    (["--init-image", "{init}", "--mask-blur", "2"], "--mask-blur feathers an inpainting mask; pass --mask as well"),
    (["--mask", "{mask}"], "--mask needs --init-image"),
    (["--strength", "0.5"], "--strength needs --init-image"),
    (["--from-file", "{tmp}/two.txt", "--init-image", "{tmp}/three"], "got 2 prompts, 3 init images and 0 masks"),
    (["--from-png", "{tmp}/img2img.png"], "was made from an init image (Denoising strength 0.6); pass the same --init-image"),
])
def test_bad_image_arguments_exit_2_in_one_sentence_and_write_nothing(tiny_model_dir, tmp_path, pictures, capsys, args, message):
    init, mask = pictures
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "empty").mkdir()
    (tmp_path / "three").mkdir()
    for k in range(3):
        Image.open(init).save(tmp_path / "three" / f"{k}.png")
    (tmp_path / "two.txt").write_text("a cat\na dog\n")
    Image.new("L", (8, 8)).save(tmp_path / "small.png")
    save_png(tmp_path / "img2img.png", Image.new("RGB", (16, 16)),
             GenerationParams("a cat", steps=4, width=16, height=16, extra={"Denoising strength": "0.6"}))
    fill = lambda a: str(a).replace("{tmp}", str(tmp_path)).replace("{init}", str(init)).replace("{mask}", str(mask))  # noqa: E731
    before = sorted(tmp_path.rglob("*"))
    args = [fill(a) for a in args]
    rc = generate(tiny_model_dir, tmp_path / "out", *([] if "--from-png" in args or "--from-file" in args else ["--prompt", "x"]), *args)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert fill(message) in err and len(err.splitlines()) == 1, err
    assert sorted(tmp_path.rglob("*")) == before


def test_inpainting_model_without_a_mask_exits_2(tiny_inpaint_model_dir, tmp_path, pictures, capsys):
    init, mask = pictures
    assert generate(tiny_inpaint_model_dir, tmp_path / "out", "--prompt", "x", "--init-image", init) == 2
    err = capsys.readouterr().err.strip()
    assert "inpainting UNet" in err and "pass --init-image and --mask" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert generate(tiny_inpaint_model_dir, tmp_path / "out", "--prompt", "x", "--init-image", init, "--mask", mask) == 0
