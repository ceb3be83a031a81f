"""Every file a job writes appears whole or not at all: written under a temporary name, then renamed.

A crash between writing and renaming is simulated by making the rename (os.replace / os.rename, which
Path.replace, Path.rename and shutil.move go through) raise. A writer that writes the final name directly
does not go through the rename, so its file is still there afterwards: that is what these tests catch,
whichever module the writer lives in.
"""
import os
import re
from pathlib import Path

import pytest
from PIL import Image


def generate(*args) -> int:
    """The batch script (`latentdiff generate PROMPT [options]`), in-process: the only place naming its entry point."""
    from latentdiff.cli import main

    return main(["generate", *map(str, args)])


@pytest.fixture
def crash_before_rename(monkeypatch):
    """crash_before_rename(pattern): from now on, a rename (or the hard link that publishes a file exclusively) onto
    a name matching the glob pattern raises OSError."""
    real = {"replace": os.replace, "rename": os.rename, "link": os.link}
    refused = []

    def arm(pattern: str = "*"):
        def make(name):
            def fake(src, dst, *args, **kwargs):
                if Path(os.fspath(dst)).match(pattern):
                    refused.append(Path(os.fspath(dst)))
                    raise OSError(28, "No space left on device (simulated crash before the rename)")
                return real[name](src, dst, *args, **kwargs)
            return fake

        for name in real:
            monkeypatch.setattr(os, name, make(name))
        return refused

    return arm


def final_files(folder, regex: str) -> list[str]:
    """Names under `folder` (recursively) that are final names (temporary names never match `regex`)."""
    return sorted(p.name for p in Path(folder).rglob("*") if re.fullmatch(regex, p.name))


def run_crashing(fn, *args, **kwargs):
    """Call a writer whose rename will fail: it may raise the OSError or report it and return non-zero."""
    try:
        result = fn(*args, **kwargs)
    except OSError:
        return None
    assert result != 0, "a job whose writes failed must not report success"
    return result


def test_samples_of_the_batch_script_are_never_left_half_written(tiny_model_dir, tmp_path, crash_before_rename):
    refused = crash_before_rename("*.png")
    run_crashing(generate, "a cat", "--model", tiny_model_dir, "--outdir", tmp_path / "out", "--n-samples", "2",
                 "--steps", "2", "--precision", "fp32", "--no-progress")
    assert refused, "the samples must be renamed into place"
    assert final_files(tmp_path / "out", r"\d{5}\.png|grid-\d{4}\.png") == []


def test_grid_of_the_batch_script_is_never_left_half_written(tiny_model_dir, tmp_path, crash_before_rename):
    refused = crash_before_rename("grid-*.png")
    out = tmp_path / "out"
    run_crashing(generate, "a cat", "--model", tiny_model_dir, "--outdir", out, "--n-samples", "2", "--n-iter", "2",
                 "--steps", "2", "--precision", "fp32", "--no-progress")
    assert [p.name for p in refused] == ["grid-0000.png"]
    assert final_files(out, r"\d{5}\.png") == [f"{k:05d}.png" for k in range(4)]  # these were fine
    assert final_files(out, r"grid-\d{4}\.png") == []


@pytest.mark.parametrize("pattern, survivors", [("*", []), ("metadata.jsonl", ["00000.png", "00001.png", "00002.png"])])
def test_make_shapes_writes_images_and_metadata_atomically(tmp_path, crash_before_rename, pattern, survivors):
    from latentdiff.data import make_shapes

    refused = crash_before_rename(pattern)
    run_crashing(make_shapes, tmp_path / "data", 3, size=16)
    assert refused
    assert final_files(tmp_path / "data", r"\d{5}\.png|metadata\.jsonl") == survivors
    assert not (tmp_path / "data" / "metadata.jsonl").exists()  # a folder without it is an unfinished dataset


def test_latent_cache_entries_are_written_atomically(tmp_path, crash_before_rename):
    from conftest import tiny_components

    from latentdiff.data import LatentCache, make_shapes, scan_captioned_images

    make_shapes(tmp_path / "data", 2, size=16)
    items = scan_captioned_images(tmp_path / "data")
    _, vae, _, _ = tiny_components()
    cache = LatentCache(tmp_path / "cache", vae, 16)
    refused = crash_before_rename("*.safetensors")
    run_crashing(cache.build, items, 2, progress=False)
    assert refused
    assert not list((tmp_path / "cache").glob("*.safetensors"))
    assert all(not cache.path_for(path).exists() for path, _ in items)


def test_saved_model_folder_and_single_file_appear_whole_or_not_at_all(tiny_model_dir, tmp_path, crash_before_rename):
    from latentdiff.checkpoints import save_single_file
    from latentdiff.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(tiny_model_dir, device="cpu", precision="fp32")
    refused = crash_before_rename("model*")
    run_crashing(pipe.save_pretrained, tmp_path / "model")
    assert not (tmp_path / "model").exists()
    run_crashing(save_single_file, tmp_path / "model.safetensors", pipe.unet, pipe.vae, pipe.text_encoder, schedule=pipe.schedule)
    assert not (tmp_path / "model.safetensors").exists()
    assert {p.name for p in refused} == {"model", "model.safetensors"}


def test_lora_file_appears_whole_or_not_at_all(tmp_path, crash_before_rename):
    from conftest import tiny_components

    from latentdiff.training import lora

    unet, _, text_encoder, _ = tiny_components()
    lora.add_lora(unet, [text_encoder], rank=2)
    refused = crash_before_rename("*.safetensors")
    run_crashing(lora.save_lora, tmp_path / "lora" / "pytorch_lora_weights.safetensors", unet, {"text_encoder": text_encoder})
    assert refused
    assert not list((tmp_path / "lora").rglob("*.safetensors"))


def test_validation_grid_appears_whole_or_not_at_all(tiny_model_dir, tmp_path, crash_before_rename):
    from latentdiff.pipeline import load_pipeline
    from latentdiff.training.validation import validation_grid

    pipe = load_pipeline(tiny_model_dir, device="cpu", precision="fp32")
    refused = crash_before_rename("step-*.png")
    run_crashing(validation_grid, pipe, ["a cat"], [0], 1, 1.0, tmp_path / "validation" / "step-000010.png")
    assert refused
    assert not (tmp_path / "validation" / "step-000010.png").exists()


def test_without_a_crash_nothing_temporary_is_left(tiny_model_dir, tmp_path):
    """The control: the same writers, no crash, every final file present and no temporary one."""
    from latentdiff.data import make_shapes

    assert generate("a cat", "--model", tiny_model_dir, "--outdir", tmp_path / "out", "--n-samples", "2",
                    "--steps", "2", "--precision", "fp32", "--no-progress") == 0
    make_shapes(tmp_path / "data", 2, size=16)
    names = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert names == ["data/00000.png", "data/00001.png", "data/metadata.jsonl", "out/.jobs.lock",
                     "out/grid-0000.png", "out/jobs.jsonl", "out/samples/00000.png", "out/samples/00001.png"]
    Image.open(tmp_path / "out" / "grid-0000.png").verify()
