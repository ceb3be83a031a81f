"""Several LoRAs at once, by name and scale, against diffusers' load_lora_weights + set_adapters; A1111 prompt tags."""
import pytest
import torch

from helpers import random_lora_file
from latentdiff import text
from latentdiff.adapters import lora_hash, lora_tags
from latentdiff.pipeline import load_pipeline

PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    random_lora_file(tiny_model_dir, folder / "ink.safetensors", seed=1, text_encoder=True)
    (folder / "styles").mkdir()
    random_lora_file(tiny_model_dir, folder / "styles" / "chalk.safetensors", seed=2, text_encoder=True)
    return folder


def _pipe(model_dir):
    return load_pipeline(model_dir, device="cpu", precision="fp32")


def _eps(pipe):
    """The UNet's prediction on fixed inputs through the text encoder: both adapters' effects in one tensor."""
    ids = text.tokenize(pipe.tokenizer, [PROMPT])
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        return pipe.unet(x, t, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample


def _latents(pipe, prompt=PROMPT, **kw):
    return pipe(prompt, num_inference_steps=3, seed=7, output_type="latents", progress=False, **kw).images


def test_two_loras_with_scales_equal_diffusers_set_adapters(tiny_model_dir, lora_dir):
    from diffusers import StableDiffusionPipeline

    ours = _pipe(tiny_model_dir)
    base = _eps(ours)
    assert ours.load_lora(lora_dir / "ink.safetensors", scale=0.7) == "ink"
    assert ours.load_lora(lora_dir / "styles/chalk.safetensors", scale=-0.4, name="chalk") == "chalk"
    theirs = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    theirs.load_lora_weights(str(lora_dir / "ink.safetensors"), adapter_name="ink")
    theirs.load_lora_weights(str(lora_dir / "styles/chalk.safetensors"), adapter_name="chalk")
    theirs.set_adapters(["ink", "chalk"], adapter_weights=[0.7, -0.4])
    mine = _eps(ours)
    assert (mine - base).abs().max() > 1e-3
    torch.testing.assert_close(mine, _eps(theirs), atol=1e-4, rtol=0)

    ours.set_lora_scales({"chalk": 1.5})  # no reload: peft's scaling alone
    theirs.set_adapters(["ink", "chalk"], adapter_weights=[0.7, 1.5])
    torch.testing.assert_close(_eps(ours), _eps(theirs), atol=1e-4, rtol=0)

    ours.unload_lora("ink")
    ours.unload_lora("chalk")
    torch.testing.assert_close(_eps(ours), base, atol=0, rtol=0)
    assert ours.loras.files == {}


def test_prompt_tags_apply_for_their_generation_only(tiny_model_dir, lora_dir):
    tagged = _pipe(tiny_model_dir)
    base = _latents(tagged)
    with_tag = _latents(tagged, f"<lora:chalk:0.8> {PROMPT}", lora_dir=lora_dir)
    torch.testing.assert_close(_latents(tagged), base, atol=0, rtol=0)  # off again after the call

    loaded = _pipe(tiny_model_dir)
    loaded.load_lora(lora_dir / "styles/chalk.safetensors", scale=0.8)
    torch.testing.assert_close(with_tag, _latents(loaded), atol=1e-6, rtol=0)
    assert (with_tag - base).abs().max() > 1e-3
    # a tag overrides a loaded LoRA's scale for its call: chalk at 0 is the plain model
    torch.testing.assert_close(_latents(loaded, f"{PROMPT} <lora:chalk:0>"), base, atol=1e-6, rtol=0)


def test_lora_tags_are_read_as_a1111_writes_them():
    assert lora_tags("<lora:ink:0.5> a red circle, <lora:chalk>") == ("a red circle", {"ink": 0.5, "chalk": 1.0})
    assert lora_tags("plain") == ("plain", {})


@pytest.mark.parametrize("prompt, message", [
    ("<lora:ink:heavy> x", "prompt tag <lora:ink:heavy> has a weight that is not a number."),
    ("<lora:ink:1:2> x", "prompt tag <lora:ink:1:2> must look like <lora:name> or <lora:name:weight>."),
    ("<lora:ink:1> <lora:ink:2> x", "the prompt names LoRA 'ink' twice with different weights."),
])
def test_bad_tags_are_one_sentence(prompt, message):
    with pytest.raises(ValueError) as info:
        lora_tags(prompt)
    assert str(info.value) == message


def test_lora_mistakes_are_named(tiny_model_dir, lora_dir, tmp_path):
    pipe = _pipe(tiny_model_dir)
    with pytest.raises(ValueError, match=r"names <lora:ink>, which is not loaded; give lora_dir="):
        _latents(pipe, f"<lora:ink> {PROMPT}")
    with pytest.raises(ValueError, match=r"no LoRA named 'nope' in .* \(expected nope.safetensors there\)"):
        _latents(pipe, f"<lora:nope> {PROMPT}", lora_dir=lora_dir)
    with pytest.raises(ValueError, match="the prompts of one call name different <lora:…> tags"):
        _latents(pipe, [f"<lora:ink> {PROMPT}", PROMPT], lora_dir=lora_dir)
    pipe.load_lora(lora_dir / "ink.safetensors")
    with pytest.raises(ValueError, match=r"a LoRA named 'ink' is already loaded \(from .*ink.safetensors\)"):
        pipe.load_lora(lora_dir / "ink.safetensors")
    with pytest.raises(ValueError, match=r"no LoRA named 'chalk' is loaded \(loaded: ink\)"):
        pipe.set_lora_scales({"chalk": 1.0})
    with pytest.raises(ValueError, match="LoRA file .*missing.safetensors does not exist"):
        pipe.load_lora(tmp_path / "missing.safetensors")


def test_lora_hash_is_a1111s_addnet_hash(lora_dir, tmp_path):
    """sha256 of the tensor bytes after the safetensors header: a metadata change keeps the hash."""
    import hashlib

    from safetensors.torch import load_file, save_file

    path = lora_dir / "ink.safetensors"
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert lora_hash(path) == hashlib.sha256(raw[8 + header:]).hexdigest()[:12]
    copy = tmp_path / "copy.safetensors"
    save_file(load_file(path), copy, metadata={"note": "renamed"})
    assert lora_hash(copy) == lora_hash(path)


# --- the batch script ---------------------------------------------------------------------------------------------

def _run(tiny_model_dir, out, *args):
    from latentdiff.commands.generate import main

    return main(["--model", tiny_model_dir, "--outdir", out, "--steps", "3", "--precision", "fp32", "--skip-grid",
                 "--no-progress", *map(str, args)])


def test_script_applies_lora_flags_and_tags_and_records_their_hashes(tiny_model_dir, lora_dir, tmp_path):
    import numpy as np
    from PIL import Image

    from latentdiff.pngmeta import read_params

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n<lora:chalk:0.8> {PROMPT}\n")
    assert _run(tiny_model_dir, tmp_path / "out", "--from-file", prompts, "--lora", f"{lora_dir / 'ink.safetensors'}:0.5",
                "--lora-dir", lora_dir, "--n-samples", "2", "--seed", "3") == 0
    files = sorted((tmp_path / "out" / "samples").glob("*.png"))
    plain, tagged = files[0], files[2]  # seeds 3 and 5
    ink, chalk = lora_hash(lora_dir / "ink.safetensors"), lora_hash(lora_dir / "styles/chalk.safetensors")
    assert read_params(plain).extra["Lora hashes"] == f"ink: {ink}"
    assert read_params(tagged).extra["Lora hashes"] == f"ink: {ink}, chalk: {chalk}"
    assert read_params(tagged).prompt == f"<lora:chalk:0.8> {PROMPT}"  # A1111 keeps the tag in the infotext

    # the same images from the API, one call each (the script split its batch by tag set)
    pipe = _pipe(tiny_model_dir)
    pipe.load_lora(lora_dir / "ink.safetensors", scale=0.5)
    for path, prompt, seed in ((plain, PROMPT, 3), (tagged, f"<lora:chalk:0.8> {PROMPT}", 5)):
        image = pipe(prompt, num_inference_steps=3, seed=seed, output_type="numpy", progress=False,
                     lora_dir=lora_dir).images[0]
        assert np.array_equal(np.asarray(Image.open(path)), image)
    # --from-png replays the tag through --lora-dir
    assert _run(tiny_model_dir, tmp_path / "again", "--from-png", tagged, "--lora", lora_dir / "ink.safetensors:0.5",
                "--lora-dir", lora_dir) == 0
    again = next((tmp_path / "again" / "samples").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(tagged)))
    # a batch that mixes tag sets (as a resumed run's can) is split per tag set and makes the same images
    for f in files[1:3]:
        f.unlink()
    assert _run(tiny_model_dir, tmp_path / "out", "--from-file", prompts, "--lora", f"{lora_dir / 'ink.safetensors'}:0.5",
                "--lora-dir", lora_dir, "--n-samples", "2", "--seed", "3") == 0
    assert np.array_equal(np.asarray(Image.open(files[2])), np.asarray(Image.open(again)))


@pytest.mark.parametrize("args, message", [
    (["--lora", "LORA_DIR/missing.safetensors"], "--lora LORA_DIR/missing.safetensors is not a .safetensors file"),
    (["--lora", "LORA_DIR/ink.safetensors:strong"], "the scale after the last ':' is not a number"),
    (["--lora-dir", "LORA_DIR/ink.safetensors"], "--lora-dir LORA_DIR/ink.safetensors is not a folder"),
    (["--prompt-tag", "<lora:ink>"], "the prompt names <lora:ink>; give --lora-dir"),
    (["--prompt-tag", "<lora:nope>", "--lora-dir", "LORA_DIR"], "no LoRA named 'nope' in LORA_DIR"),
])
def test_script_refuses_bad_lora_input_before_any_work(tiny_model_dir, lora_dir, tmp_path, capsys, args, message):
    tag = args[1] if args[0] == "--prompt-tag" else ""
    args = [a.replace("LORA_DIR", str(lora_dir)) for a in (args[2:] if tag else args)]
    assert _run(tiny_model_dir, tmp_path / "out", "--prompt", f"{tag} {PROMPT}".strip(), *args) == 2
    assert message.replace("LORA_DIR", str(lora_dir)) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_lora_for_another_base_model_names_the_layer_and_both_shapes(tiny_model_dir, tmp_path):
    from conftest import tiny_components
    from latentdiff.pipeline import LatentDiffusionPipeline
    from latentdiff.schedulers import ScheduleConfig

    other = tmp_path / "wide-model"
    unet, vae, text_encoder, tokenizer = tiny_components(cross_dim=48)
    LatentDiffusionPipeline(unet, vae, text_encoder, tokenizer, ScheduleConfig()).save_pretrained(other)
    foreign = random_lora_file(other, tmp_path / "foreign.safetensors")
    pipe = _pipe(tiny_model_dir)
    base = _eps(pipe)
    with pytest.raises(ValueError, match=r"foreign.safetensors does not fit this model: layer \S+attn2.to_v\S* is "
                                         r"torch.Size\(\[4, 48\]\) in the file and torch.Size\(\[4, 32\]\) here"):
        pipe.load_lora(foreign)
    assert pipe.loras.files == {} and not getattr(pipe.unet, "peft_config", {})
    torch.testing.assert_close(_eps(pipe), base, atol=0, rtol=0)  # nothing of it stays behind
