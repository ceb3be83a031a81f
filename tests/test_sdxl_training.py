"""SDXL training on the tiny SDXL model (conftest.sdxl_dir): the UNet conditioned as diffusers conditions it, the size
micro-conditioning from each image's original size and crop, LoRA files diffusers loads, exact resume, full fine-tunes
that load and export."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from test_sdxl import TOLERANCE, _ours, _theirs
from test_training import read_log

from latentdiff.commands.train import main
from latentdiff.pipeline import load_pipeline

RESOLUTION = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models train on one thread


def noise_image(path, width: int, height: int, seed: int):
    """Random RGB pixels: any two crops of it differ."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """12 captioned images, none square and of six sizes, so original sizes and crops differ from image to image."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(12):
        width, height = (98, 64) if i % 2 else (40 + 4 * i, 48 + 2 * i)
        noise_image(root / f"{i:02d}.png", width, height, seed=i)
        (root / f"{i:02d}.txt").write_text(["a red circle", "a green star", "a blue square"][i % 3])
    return root


@pytest.fixture(scope="module")
def pipe(sdxl_dir):
    return load_pipeline(sdxl_dir, device="cpu", precision="fp32", optimize=False)


@pytest.fixture(scope="module")
def reference(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(sdxl_dir)


def train_args(model, data, out, *extra) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--output-dir", str(out), "--resolution", str(RESOLUTION),
            "--batch-size", "2", "--num-workers", "0", "--log-every", "1", "--checkpoint-every", "0", *extra]


# ----------------------------------------------------------------------------------------- conditioning


def test_denoiser_predicts_what_diffusers_unet_predicts(pipe, reference):
    """The trainer's Denoiser on a caption (and a dropped, empty one) equals diffusers' UNet called with
    StableDiffusionXLPipeline.encode_prompt's context and pooled embeds and _get_add_time_ids' time ids."""
    from latentdiff import text
    from latentdiff.training.trainer import Denoiser, time_ids

    captions, originals, crops = ["a red circle on a blue background", ""], [(96, 64), (48, 40)], [(0, 16), (8, 0)]
    generator = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([999, 250])

    batch = {"original_size": torch.tensor(originals), "crop_top_left": torch.tensor(crops)}
    ids = [text.tokenize(tokenizer, captions) for tokenizer in pipe.conditioner.tokenizers]
    with torch.no_grad():
        ours = Denoiser(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)(x_t, t, ids, time_ids(batch, RESOLUTION))

        context, _, pooled, _ = reference.encode_prompt(captions, do_classifier_free_guidance=False)
        projection = reference.text_encoder_2.config.projection_dim
        theirs_ids = torch.cat([reference._get_add_time_ids(o, c, (RESOLUTION, RESOLUTION), dtype=context.dtype,
                                                            text_encoder_projection_dim=projection)
                                for o, c in zip(originals, crops)])
        theirs = reference.unet(x_t, t, encoder_hidden_states=context,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": theirs_ids}).sample
    assert context.shape == (2, 77, 32 + 48)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_items_carry_the_original_size_and_crop_diffusers_scripts_compute(tmp_path, pipe):
    """A 98×64 image at resolution 32: resized to 49×32, so the square can start at x = 0 … 17. original_size is
    (height, width) before resizing; crop_top_left is (top, left) of the square in the resized image, in the mirrored
    one when flipped (diffusers' SDXL scripts flip, then crop): the centred square [8, 40) of a mirrored image is
    [49 − 40, 49 − 8) = [9, 41) of it. The latent cache gives the same numbers."""
    from latentdiff.data import CachedLatentDataset, CaptionedImageDataset, LatentCache

    path = noise_image(tmp_path / "wide.png", 98, 64, seed=0)
    items = [(path, "a wide image")]

    centred = CaptionedImageDataset(items, RESOLUTION)[0]["pixel_values"]
    images = CaptionedImageDataset(items, RESOLUTION, random_flip=True, seed=3)

    def seen(dataset) -> dict:
        """{flipped: {(original_size, crop_top_left), …}} over 12 epochs; whether an epoch flips, from the pixels."""
        out = {False: set(), True: set()}
        for epoch in range(12):
            dataset.set_epoch(epoch)
            images.set_epoch(epoch)
            item = dataset[0]
            out[not torch.equal(images[0]["pixel_values"], centred)].add(
                (tuple(item["original_size"].tolist()), tuple(item["crop_top_left"].tolist())))
        return out

    assert seen(CaptionedImageDataset(items, RESOLUTION, random_flip=True, seed=3)) == {
        False: {((64, 98), (0, 8))}, True: {((64, 98), (0, 9))}}
    cache = LatentCache(tmp_path / "cache", pipe.vae, RESOLUTION, random_flip=True)
    cache.build(items, batch_size=1, progress=False)
    assert seen(CachedLatentDataset(cache, items, seed=3)) == {False: {((64, 98), (0, 8))}, True: {((64, 98), (0, 9))}}

    # random crops: the pixels are the resized (mirrored) image's square at crop_top_left
    resized = Image.open(path).resize((49, 32), Image.Resampling.LANCZOS)
    lefts = set()
    dataset = CaptionedImageDataset(items, RESOLUTION, center_crop=False, random_flip=True, seed=3)
    for epoch in range(12):
        dataset.set_epoch(epoch)
        item = dataset[0]
        top, left = item["crop_top_left"].tolist()
        found = [torch.equal(item["pixel_values"], torch.from_numpy(np.array(
            image.crop((left, top, left + RESOLUTION, top + RESOLUTION)))).permute(2, 0, 1).float() / 127.5 - 1)
            for image in (resized, resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT))]
        assert found.count(True) == 1 and top == 0 and 0 <= left <= 17, (epoch, top, left)
        lefts.add((left, found[1]))
    assert len({left for left, _ in lefts}) > 3 and {flipped for _, flipped in lefts} == {False, True}


# ----------------------------------------------------------------------------------------- LoRA


def test_lora_run_saves_files_diffusers_and_latentdiff_load_alike(sdxl_dir, photos, tmp_path, pipe, reference):
    """LoRA on the UNet and both encoders: finite losses, trained adapters in diffusers' SDXL layout (loaded by
    diffusers' load_lora_weights and latentdiff's Loras to the same images) and in kohya's (lora_unet_, lora_te1_,
    lora_te2_; loaded by both to the same images as the diffusers-layout file)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    assert main(train_args(sdxl_dir, photos, out, "--max-steps", "3", "--lr", "3e-2", "--lora-rank", "4",
                           "--lora-alpha", "8", "--lora-text-encoder", "--random-flip", "--export-single-file")) == 0
    assert [r["step"] for r in read_log(out)] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in read_log(out))
    layers = load_file(out / "pytorch_lora_weights.safetensors")
    for component in ("unet", "text_encoder", "text_encoder_2"):
        trained = [v.abs().max().item() for k, v in layers.items() if k.startswith(component + ".") and "lora_B" in k]
        assert trained and max(trained) > 0, component  # B starts at zero
    with safe_open(out / "lora.safetensors", "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_network_alpha"] == "8"

    base = _ours(pipe, "euler")
    images = {}
    for name in ("pytorch_lora_weights", "lora"):  # one file at a time in each pipeline
        pipe.load_lora(out / f"{name}.safetensors")
        reference.load_lora_weights(str(out / f"{name}.safetensors"), adapter_name=name)
        try:
            images[name] = _ours(pipe, "euler")
            assert (images[name] - _theirs(reference, "euler")).abs().max().item() < TOLERANCE, name
        finally:
            pipe.unload_lora(name)
            reference.delete_adapters(name)
    assert (images["pytorch_lora_weights"] - base).abs().max().item() > 0.01  # the adapters were trained
    assert (images["lora"] - images["pytorch_lora_weights"]).abs().max().item() < 1e-5


# ----------------------------------------------------------------------------------------- resume


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(sdxl_dir, photos, tmp_path):
    """LoRA on the UNet and both encoders from cached latents (flips, their crops), EMA, caption dropout and gradient
    accumulation: 1 step + resume + 1 step = 2 steps, bit for bit (12 images, 3 steps an epoch: resumed mid-epoch)."""
    from safetensors.torch import load_file

    run = ("--lr", "1e-2", "--lr-schedule", "constant", "--lora-rank", "4", "--lora-text-encoder", "--cache-latents",
           "--random-flip", "--ema-decay", "0.9", "--caption-dropout", "0.3", "--gradient-accumulation", "2")
    full, split = tmp_path / "full", tmp_path / "split"
    torch.manual_seed(1)  # the global generator's history (earlier tests, other work in the process) must not matter
    assert main(train_args(sdxl_dir, photos, full, "--max-steps", "2", *run)) == 0
    torch.manual_seed(2)
    assert main(train_args(sdxl_dir, photos, split, "--max-steps", "1", "--checkpoint-every", "1", *run)) == 0
    assert main(train_args(sdxl_dir, photos, split, "--max-steps", "2", "--resume", "latest", *run)) == 0
    a, b = (load_file(out / "pytorch_lora_weights.safetensors") for out in (full, split))
    assert a.keys() == b.keys() and any(k.startswith("text_encoder_2.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_log(full)] == [r["loss"] for r in read_log(split)]


# ----------------------------------------------------------------------------------------- full fine-tune


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one state per process whose mixed precision cannot change: a bf16 run among the suite's fp32
    runs needs it cleared before and after (as accelerate's own AccelerateTestCase does after every test)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_full_fine_tune_in_bf16_loads_generates_and_exports(sdxl_dir, photos, tmp_path, fresh_accelerate_state):
    """UNet and both text encoders trained under bf16 autocast; every trained parameter gets a gradient (CLIP-L's last
    layer and final norm, past the penultimate hidden state SDXL reads, are frozen and stay as they were); the folder
    and the single file load with the same weights and generate."""
    from safetensors.torch import load_file

    from latentdiff.training.state import load_state

    def weights(models) -> dict:  # {"unet/conv_in.weight": …}; transformers 5 writes CLIPTextModel without text_model.
        return {f"{name}/{k.removeprefix('text_model.')}": v for name, state in models for k, v in state.items()}

    def files(folder) -> dict:
        return weights((sub, load_file(f)) for sub in ("unet", "text_encoder", "text_encoder_2", "vae")
                       for f in (folder / sub).glob("*.safetensors"))

    out = tmp_path / "ft"
    assert main(train_args(sdxl_dir, photos, out, "--max-steps", "2", "--lr", "1e-3", "--train-text-encoder",
                           "--mixed-precision", "bf16", "--no-cache-latents", "--export-single-file",
                           "--checkpoint-every", "2")) == 0
    optimizer = load_state(out / "checkpoints" / "ckpt-000002", "optimizer")
    trained = [i for group in optimizer["param_groups"] for i in group["params"]]
    assert sorted(optimizer["state"]) == trained, "every trained parameter had a gradient (DDP waits for each)"
    before, after = files(sdxl_dir), files(out / "model")
    assert before.keys() == after.keys()
    moved = {k.split("/")[0] for k in after if not torch.equal(after[k], before[k])}
    assert moved == {"unet", "text_encoder", "text_encoder_2"}
    assert all(torch.equal(after[k], before[k]) for k in after
               if k.startswith(("text_encoder/encoder.layers.4.", "text_encoder/final_layer_norm.")))
    for model in ("model", "model.safetensors"):
        loaded = load_pipeline(out / model, device="cpu", precision="fp32", optimize=False)
        state = weights((name, getattr(loaded, name).state_dict()) for name in ("unet", "text_encoder", "text_encoder_2", "vae"))
        assert loaded.is_sdxl and all(torch.equal(state[k], v) for k, v in after.items()), model
        image = loaded("a red circle", seed=0, num_inference_steps=2, output_type="numpy", progress=False).images
        assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_from_scratch_run_on_sdxl_component_configs_saves_an_sdxl_folder(pipe, photos, tmp_path):
    """--model-config with SDXL component configs (text_encoder_2/ among them): random SDXL weights, trained and saved
    as StableDiffusionXLPipeline's layout."""

    configs = tmp_path / "configs"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, name)
        model.config.save_pretrained(configs / name) if name.startswith("text") else model.save_config(configs / name)
    (configs / "tokenizer_2_config.json").write_text(json.dumps({"pad_token": "!", "model_max_length": 77}))
    args = train_args(configs, photos, tmp_path / "run", "--max-steps", "1", "--no-cache-latents")
    assert main(["--model-config", *args[1:]]) == 0
    trained = load_pipeline(tmp_path / "run" / "model", device="cpu", precision="fp32")
    assert trained.is_sdxl and trained.tokenizer_2.pad_token == "!"
    assert json.loads((tmp_path / "run" / "model" / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
