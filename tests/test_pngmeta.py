"""A1111-style `parameters` text: written, parsed back, and read from other tools' PNGs."""
import pytest
from PIL import Image

from latentdiff.pngmeta import GenerationParams, read_params, save_png, write_numbered, write_png


def test_round_trip_with_awkward_text(tmp_path):
    params = GenerationParams(prompt="a red, circle\non two lines", negative_prompt="blurry, bad: art", steps=20,
                              sampler="dpmpp_2m", cfg_scale=7.5, seed=4294967295, width=64, height=48, model="default_model",
                              model_hash="1234567890", extra={"Precision": "bf16", "Note": 'x: "y", z'})
    save_png(tmp_path / "a.png", Image.new("RGB", (64, 48)), params)
    assert read_params(tmp_path / "a.png") == params
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temporary file left behind


def test_reads_a1111_text():
    text = ("masterpiece, a cat\nNegative prompt: lowres\n"
            "Steps: 28, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: abc123, Model: v1-5")
    p = GenerationParams.from_text(text)
    assert (p.prompt, p.negative_prompt, p.steps, p.sampler, p.cfg_scale) == ("masterpiece, a cat", "lowres", 28, "euler_ancestral", 7.0)
    assert (p.seed, p.width, p.height, p.model, p.model_hash) == (1234, 512, 768, "v1-5", "abc123")


def test_rejects_text_without_parameters_line(tmp_path):
    with pytest.raises(ValueError, match="Steps"):
        GenerationParams.from_text("just a caption")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="no 'parameters' text chunk"):
        read_params(tmp_path / "plain.png")


def test_quoted_values_with_backslashes_round_trip():
    """A1111 quotes with JSON, so a backslash before a quote survives (it was corrupted before)."""
    params = GenerationParams("a, b", extra={"Note": 'x\\"y, z', "Lora": "café: 0.8"})
    assert GenerationParams.from_text(params.to_text()).extra == params.extra


def test_saving_replaces_an_existing_png_unless_exclusive(tmp_path):
    """Re-saving a PNG replaces it; `generate` saves exclusively and must never overwrite an earlier image."""
    path, image = tmp_path / "a.png", Image.new("RGB", (4, 4))
    save_png(path, image, GenerationParams("first"))
    save_png(path, image, GenerationParams("second"))
    with pytest.raises(FileExistsError):
        save_png(path, image, GenerationParams("third"), exclusive=True)
    with pytest.raises(FileExistsError):
        write_png(path, image, "fourth\nSteps: 1", exclusive=True)
    assert read_params(path).prompt == "second"
    write_png(path, image, "fifth\nSteps: 1")
    assert read_params(path).prompt == "fifth"
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_write_numbered_takes_the_first_free_number_from_the_png_count_on(tmp_path):
    """Two PNGs (a user deleted 00001), so numbering starts at 2, which is taken: the image becomes 00003, and
    00002 is left as it was."""
    def name(n):
        return f"{n:05d}-7.png"

    for n in (0, 2):
        write_png(tmp_path / name(n), Image.new("RGB", (4, 4)), f"old {n}\nSteps: 1")
    (tmp_path / "notes.txt").write_text("not a PNG: not counted")
    path = write_numbered(tmp_path, name, Image.new("RGB", (4, 4)), "new\nSteps: 2")
    assert path == tmp_path / "00003-7.png" and read_params(path).prompt == "new"
    assert read_params(tmp_path / "00002-7.png").prompt == "old 2"
    assert write_numbered(str(tmp_path), name, Image.new("RGB", (4, 4))) == tmp_path / "00004-7.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name(n) for n in (0, 2, 3, 4)] + ["notes.txt"]  # no temporaries
