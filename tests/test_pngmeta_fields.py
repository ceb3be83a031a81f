"""pngmeta.py field by field: the exact `parameters` text latentdiff writes (quoting, omitted empty fields), and what
the reader makes of A1111 texts that leave fields out, have an empty prompt, or carry odd newlines."""
import pytest
from PIL import Image

from latentdiff.config import DEFAULTS
from latentdiff.pngmeta import GenerationParams, read_params, write_png


def test_to_text_writes_a1111_fields_in_order_and_omits_empty_ones():
    p = GenerationParams(prompt="a cat", steps=20, sampler="dpmpp_2m", cfg_scale=7.5, seed=42, width=64, height=48,
                         model="default_model", model_hash="", extra={"Precision": "fp32"})
    assert p.to_text() == ("a cat\n"
                           "Steps: 20, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 42, Size: 64x48, Model: default_model, Precision: fp32")
    assert GenerationParams(prompt="x", cfg_scale=5.0, model="m", model_hash="abc").to_text().endswith(
        "CFG scale: 5, Seed: 0, Size: 512x512, Model hash: abc, Model: m")  # 5.0 is written as A1111 writes it


def test_values_with_commas_colons_or_quotes_are_quoted_and_only_those():
    p = GenerationParams(prompt="p", extra={"A": "x, y", "B": "k: v", "C": 'say "hi"', "D": "plain text", "E": "a-b/c"})
    assert p.to_text().split("\n")[1].endswith('A: "x, y", B: "k: v", C: "say \\"hi\\"", D: plain text, E: a-b/c')
    assert GenerationParams.from_text(p.to_text()).extra == p.extra


def test_reader_fills_defaults_for_missing_fields():
    p = GenerationParams.from_text("a cat\nSteps: 5")
    assert (p.prompt, p.negative_prompt, p.steps) == ("a cat", "", 5)
    assert (p.sampler, p.cfg_scale, p.seed) == (DEFAULTS.sampler, DEFAULTS.guidance_scale, 0)
    assert (p.width, p.height, p.model, p.model_hash, p.extra) == (512, 512, "", "", {})


def test_empty_prompt_round_trips_and_a1111s_form_without_the_empty_line_is_read():
    p = GenerationParams(prompt="", negative_prompt="lowres, blurry", steps=3)
    assert p.to_text().startswith("\nNegative prompt: lowres, blurry\nSteps: 3")
    assert GenerationParams.from_text(p.to_text()) == p
    a1111 = GenerationParams.from_text("Negative prompt: lowres\nSteps: 20, Sampler: Euler a")
    assert (a1111.prompt, a1111.negative_prompt, a1111.sampler) == ("", "lowres", "euler_ancestral")


def test_only_the_first_negative_prompt_marker_splits_prompt_from_negative():
    p = GenerationParams(prompt="a cat\non two lines", negative_prompt="dark\nNegative prompt: also this", steps=4)
    assert GenerationParams.from_text(p.to_text()) == p


def test_trailing_newlines_are_ignored_but_the_parameters_line_must_be_last():
    text = GenerationParams(prompt="a cat", model="SDX", steps=2).to_text()  # a value ending in X, the last line
    assert GenerationParams.from_text(text + "\n\n") == GenerationParams.from_text(text)
    assert GenerationParams.from_text(text).model == "SDX"
    with pytest.raises(ValueError, match=r"^the PNG's parameters text has no 'Steps: …' line; expected A1111-style generation parameters$"):
        GenerationParams.from_text(text + "\n \n")
    with pytest.raises(ValueError, match="no 'Steps: …' line"):
        GenerationParams.from_text("")


def test_quoted_values_written_by_an_older_latentdiff_are_read():
    """latentdiff once quoted as '"' + v.replace('"', '\\"') + '"' (backslashes unescaped): not JSON when the value has a
    backslash, such as a Windows path, yet read back as written."""
    text = 'a cat\nSteps: 20, Lora: "C:\\loras\\ink.safetensors, 0.8", Note: "say \\"hi\\", C:\\dir"'
    assert GenerationParams.from_text(text).extra == {"Lora": "C:\\loras\\ink.safetensors, 0.8", "Note": 'say "hi", C:\\dir'}


def test_a1111s_old_combined_sampler_name_reads_as_sampler_and_schedule_type():
    """Before A1111 1.9 the schedule was part of the sampler's name; it means what the newer separate fields mean."""
    old = GenerationParams.from_text("a cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1")
    new = GenerationParams.from_text("a cat\nSteps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1, Schedule type: Karras")
    assert old == new and (old.sampler, old.extra) == ("dpmpp_2m", {"Schedule type": "Karras"})


def test_a_schedule_type_field_wins_over_the_one_in_a_combined_sampler_name():
    """A text with both (hand-edited, or another tool's) keeps its own Schedule type: the combined name's schedule
    only fills the field in when it is missing, it never overwrites it."""
    p = GenerationParams.from_text("a cat\nSteps: 20, Sampler: DPM++ 2M Karras, Seed: 1, Schedule type: Exponential")
    assert (p.sampler, p.extra) == ("dpmpp_2m", {"Schedule type": "Exponential"})


def test_a_sampler_latentdiff_lacks_is_written_back_as_given():
    """Another tool's PNG ("DPM++ SDE", not one of latentdiff's samplers) keeps its sampler when saved again."""
    p = GenerationParams.from_text("a cat\nSteps: 20, Sampler: DPM++ SDE, Seed: 3")
    assert p.sampler == "DPM++ SDE" and "Steps: 20, Sampler: DPM++ SDE, " in p.to_text()
    assert GenerationParams.from_text(p.to_text()) == p


def test_write_png_without_parameters_writes_a_plain_png(tmp_path):
    write_png(tmp_path / "plain.png", Image.new("RGB", (4, 4), (255, 0, 0)))
    with Image.open(tmp_path / "plain.png") as im:
        assert im.format == "PNG" and "parameters" not in im.info and im.getpixel((0, 0)) == (255, 0, 0)
    write_png(tmp_path / "p.png", Image.new("RGB", (4, 4)), "a\nSteps: 1")
    assert read_params(tmp_path / "p.png").steps == 1
