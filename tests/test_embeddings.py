"""Textual-inversion embeddings in A1111's and diffusers' files, against diffusers' load_textual_inversion."""
import pytest
import torch
from safetensors.torch import save_file

from latentdiff import text
from latentdiff.pipeline import load_pipeline

WIDTH = 32  # the tiny test model's text width


def _vectors(n, seed):
    return torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embeddings")
    torch.save({"string_to_param": {"*": _vectors(3, 1)}, "name": "ignored"}, folder / "badhands.pt")  # A1111 .pt
    save_file({"emb_params": _vectors(2, 2)}, folder / "filmgrain.safetensors")  # A1111 .safetensors
    save_file({"<sparkle>": _vectors(1, 3)[0]}, folder / "learned_embeds.safetensors")  # diffusers, one vector
    return folder


def _context(pipe, prompt):
    return pipe._encode_texts([prompt], clip_skip=1)[0].context


@pytest.mark.parametrize("file, token, prompt", [
    ("badhands.pt", "badhands", "a red circle, badhands, blurry"),
    ("filmgrain.safetensors", "filmgrain", "filmgrain a blue star"),
    ("learned_embeds.safetensors", "<sparkle>", "a <sparkle> square"),
])
def test_embedding_context_equals_diffusers(tiny_model_dir, files, file, token, prompt):
    from diffusers import StableDiffusionPipeline

    ours = load_pipeline(tiny_model_dir, device="cpu", precision="fp32")
    plain = _context(ours, prompt)
    assert ours.load_embedding(files / file) == token  # A1111: the file name; diffusers: the stored token
    theirs = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    theirs.load_textual_inversion(str(files / file), token=token)
    reference = theirs.encode_prompt(prompt, "cpu", 1, False)[0][0]
    mine = _context(ours, prompt)
    assert (mine - plain).abs().max() > 1e-3
    torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-5)


def test_embedding_in_a_negative_prompt_and_a_given_token(tiny_model_dir, files):
    pipe = load_pipeline(tiny_model_dir, device="cpu", precision="fp32")
    args = dict(num_inference_steps=2, seed=1, output_type="latents", progress=False)
    plain = pipe("a red circle", negative_prompt="easynegative", **args).images
    assert pipe.load_embedding(files / "badhands.pt", token="easynegative") == "easynegative"
    assert pipe.embeddings.used("x, easynegative") == ["easynegative"] and pipe.embeddings.used("easynegatives") == []
    assert (pipe("a red circle", negative_prompt="easynegative", **args).images - plain).abs().max() > 1e-4
    # the word's vectors are the file's, in order, after the tokenizer's own
    ids = text.tokenize(pipe.tokenizer, [pipe.embeddings.expand("easynegative")])[0, 1:4]
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[ids], _vectors(3, 1))


def test_embedding_mistakes_are_named(tiny_model_dir, files, tmp_path):
    pipe = load_pipeline(tiny_model_dir, device="cpu", precision="fp32")
    save_file({"emb_params": torch.zeros(1, 768)}, tmp_path / "wide.safetensors")
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, tmp_path / "xl.safetensors")
    save_file({"a": torch.zeros(2), "b": torch.zeros(2)}, tmp_path / "other.safetensors")
    (tmp_path / "broken.pt").write_bytes(b"not a pickle")
    cases = [
        (tmp_path / "wide.safetensors", "has vectors of width 768; this text encoder takes 32"),
        (tmp_path / "xl.safetensors", "is an SDXL (clip_l/clip_g) embedding; this model takes SD 1.x/2.x ones"),
        (tmp_path / "other.safetensors", "is not an embedding: expected string_to_param, emb_params"),
        (tmp_path / "broken.pt", "cannot read embedding"),
        (tmp_path / "notes.txt", "is not an embedding file; expected .safetensors, .pt or .bin"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            pipe.load_embedding(path)
    with pytest.raises(ValueError, match="the word 'red' is already a token"):
        pipe.load_embedding(files / "filmgrain.safetensors", token="red")


def test_script_uses_embeddings_and_records_ti_hashes(tiny_model_dir, files, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from latentdiff.commands.generate import main
    from latentdiff.files import file_sha256
    from latentdiff.pngmeta import read_params

    common = ["--model", tiny_model_dir, "--steps", "2", "--precision", "fp32", "--skip-grid", "--no-progress"]
    assert main(["--prompt", "a red circle, filmgrain", "--negative-prompt", "badhands", "--embeddings-dir", files,
                 "--outdir", tmp_path / "a", *common]) == 0
    png = next((tmp_path / "a" / "samples").glob("*.png"))
    hashes = {w: file_sha256(files / f)[:12] for w, f in (("filmgrain", "filmgrain.safetensors"), ("badhands", "badhands.pt"))}
    assert read_params(png).extra["TI hashes"] == f"filmgrain: {hashes['filmgrain']}, badhands: {hashes['badhands']}"
    pipe = load_pipeline(tiny_model_dir, device="cpu", precision="fp32")
    for name in ("badhands.pt", "filmgrain.safetensors"):
        pipe.load_embedding(files / name)
    image = pipe("a red circle, filmgrain", "badhands", num_inference_steps=2, seed=42, output_type="numpy",
                 progress=False).images[0]
    assert np.array_equal(np.asarray(Image.open(png)), image)

    (tmp_path / "bad.pt").write_bytes(b"junk")
    assert main(["--prompt", "a red circle", "--embedding", tmp_path / "bad.pt", "--outdir", tmp_path / "b", *common]) == 2
    assert "cannot read embedding" in capsys.readouterr().err and not (tmp_path / "b").exists()
