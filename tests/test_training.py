"""Trainer tests on tiny models (32 px shapes, 8×8×4 latents, UNet (32, 64)): behaviour, not speed."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from helpers import file_size_limit

from latentdiff.commands.train import main, vae_main
from latentdiff.training.config import TrainConfig, parse_config

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def subprocess_env(**extra) -> dict[str, str]:
    """The environment for a trainer started as a subprocess: this checkout's latentdiff first on the path (also
    when another checkout is installed editable), one thread, offline."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}

TINY_VAE = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 16, 16], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8,
    "sample_size": 32,
}
TINY_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
    "block_out_channels": [32, 64], "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 32,
}
TINY_TEXT = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models train on one thread


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    from latentdiff.data import make_shapes

    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, 64, size=32)
    return root


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_model")
    for sub, cfg in (("vae", TINY_VAE), ("unet", TINY_UNET), ("text_encoder", TINY_TEXT)):
        (root / sub).mkdir()
        (root / sub / "config.json").write_text(json.dumps(cfg))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(
        (REPO / "configs/shapes_model/scheduler/scheduler_config.json").read_text())
    return root


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory, shapes, tiny_config) -> Path:
    out = tmp_path_factory.mktemp("vae_run")
    assert vae_main(["--model-config", str(tiny_config), "--data", str(shapes), "--output-dir", str(out),
                     "--resolution", "32", "--batch-size", "16", "--max-steps", "4", "--num-workers", "0",
                     "--checkpoint-every", "0", "--scale-samples", "32"]) == 0
    return out / "vae"


def unet_args(shapes, tiny_config, tiny_vae, out, *extra) -> list[str]:
    return ["--model-config", str(tiny_config), "--vae", str(tiny_vae), "--data", str(shapes), "--output-dir", str(out),
            "--resolution", "32", "--batch-size", "8", "--num-workers", "0", "--log-every", "1", "--lr", "1e-3",
            "--checkpoint-every", "0", *extra]


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# what a checkpoint of one process holds (no EMA): safetensors and JSON, never a pickle
CHECKPOINT_FILES = {"model.safetensors", "optimizer.json", "optimizer.safetensors", "rng-0.json", "rng-0.safetensors",
                    "trainer_state.json"}


def leftovers(out: Path) -> list[Path]:
    """Temporaries of interrupted writes anywhere under `out` (files .NAME.PID.tmp, folders NAME.tmp / NAME.old)."""
    return [p for p in out.rglob("*") if p.name.endswith((".tmp", ".old"))]


# ----------------------------------------------------------------------------------------- milestone 1


def test_vae_run_sets_scaling_factor(tiny_vae, shapes):
    from diffusers import AutoencoderKL

    from latentdiff.data import load_pixels, scan_captioned_images

    vae = AutoencoderKL.from_pretrained(tiny_vae)
    assert vae.config.scaling_factor != 1.0 and 0.01 < vae.config.scaling_factor < 100
    assert read_log(tiny_vae.parent)[-1]["step"] == 4
    # LDM's s = 1/std(z): scaled posterior samples of the training images have unit standard deviation
    with torch.no_grad():
        posterior = vae.encode(torch.stack([load_pixels(p, 32) for p, _ in scan_captioned_images(shapes)])).latent_dist
    for seed in (1, 2):
        scaled = posterior.sample(torch.Generator().manual_seed(seed)) * vae.config.scaling_factor
        assert scaled.std().item() == pytest.approx(1.0, abs=0.03)


def test_decoder_only_fine_tune_keeps_the_latent_space(tiny_vae, shapes, tmp_path):
    """--decoder-only goes on from a trained VAE and changes its decoder alone: encoder, quant_conv and
    scaling_factor stay bit for bit, so the UNet trained on those latents still fits."""
    from diffusers import AutoencoderKL

    out = tmp_path / "ft"
    assert vae_main(["--vae", str(tiny_vae), "--decoder-only", "--data", str(shapes), "--output-dir", str(out),
                     "--resolution", "32", "--batch-size", "8", "--max-steps", "3", "--num-workers", "0",
                     "--checkpoint-every", "0", "--lr", "1e-3"]) == 0
    before, after = AutoencoderKL.from_pretrained(tiny_vae), AutoencoderKL.from_pretrained(out / "vae")
    assert after.config.scaling_factor == before.config.scaling_factor
    old, new = before.state_dict(), after.state_dict()
    frozen = [k for k in old if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(old[k], new[k]) for k in frozen)
    assert not all(torch.equal(old[k], new[k]) for k in old if k.startswith("decoder."))


@pytest.mark.parametrize("args, message", [
    (["--decoder-only"], "--decoder-only fine-tunes the decoder of a trained VAE"),
    (["--vae", "VAE"], "give exactly one of --model-config"),
])
def test_vae_run_refuses_ambiguous_starts(tiny_config, tiny_vae, shapes, tmp_path, capsys, args, message):
    args = [str(tiny_vae) if a == "VAE" else a for a in args]
    assert vae_main(["--model-config", str(tiny_config), "--data", str(shapes), "--output-dir", str(tmp_path / "o"),
                     *args]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_from_scratch_run_saves_a_loadable_pipeline(shapes, tiny_config, tiny_vae, tmp_path):
    from PIL import Image

    from latentdiff.pipeline import load_pipeline

    out = tmp_path / "run"
    args = unet_args(shapes, tiny_config, tiny_vae, out, "--max-steps", "20", "--train-text-encoder",
                     "--ema-decay", "0.9", "--validation-prompts", "a red circle on a white background",
                     "--validation-seeds", "0", "1", "--validation-steps", "2", "--validation-every", "10",
                     "--checkpoint-every", "10", "--keep-checkpoints", "1")
    assert main(args) == 0
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 21))
    assert all(set(r) >= {"loss", "lr", "images_per_s"} for r in log)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-000020"]  # keep-last-1
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000010.png", "step-000020.png"]
    grid = Image.open(out / "validation" / "step-000020.png")
    assert grid.width == 2 * 128  # two seeds, cells upscaled to 128 px
    pipe = load_pipeline(out / "model", device="cpu", precision="fp32")
    assert pipe.vae.config.scaling_factor == pytest.approx(json.loads((tiny_vae / "config.json").read_text())["scaling_factor"])
    image = pipe(["a red circle on a white background"], num_inference_steps=2, seed=[0], output_type="numpy", progress=False).images
    assert image.shape == (1, 32, 32, 3)

    # the saved model holds the EMA weights (the checkpoint's shadow), not the last trained ones, and the text
    # encoder was trained too (--train-text-encoder)
    from safetensors.torch import load_file

    from latentdiff.pipeline import LatentDiffusionPipeline
    from latentdiff.training.trainer import Denoiser

    ckpt = out / "checkpoints" / "ckpt-000020"
    from latentdiff.training.state import load_state

    ema_state = load_state(ckpt, "ema")
    start = LatentDiffusionPipeline.from_config(tiny_config, seed=0)  # the run's starting weights
    names = [n for n, _ in Denoiser(start.unet, start.text_encoder).named_parameters()]
    assert ema_state["num_updates"] == 20 and len(ema_state["shadow"]) == len(names)
    ema = dict(zip(names, ema_state["shadow"]))
    saved_pipe = LatentDiffusionPipeline.from_pretrained(out / "model", device="cpu", precision="fp32")
    saved = dict(Denoiser(saved_pipe.unet, saved_pipe.text_encoder).named_parameters())
    assert all(torch.equal(saved[n].float(), ema[n]) for n in names)
    trained = {k[len("unet."):]: v for k, v in load_file(ckpt / "model.safetensors").items() if k.startswith("unet.")}
    assert sum(not torch.equal(trained[k], v) for k, v in saved_pipe.unet.state_dict().items()) > len(trained) // 2
    initial = dict(start.text_encoder.named_parameters())
    moved = [n for n, p in saved_pipe.text_encoder.named_parameters() if not torch.equal(p, initial[n])]
    assert len(moved) > len(initial) // 2


def test_shipped_configs_parse_and_build(tmp_path):
    from latentdiff.pipeline import LatentDiffusionPipeline

    for name, sub in (("shapes_unet.yaml", "train"), ("shapes_vae.yaml", "vae"), ("finetune_sd.yaml", "ft"), ("lora_sd.yaml", "ft"), ("finetune_lora.yaml", "ft")):
        from latentdiff.training.config import VAETrainConfig

        cls = VAETrainConfig if sub == "vae" else TrainConfig
        overrides = ["--data", str(tmp_path)]
        overrides += ["--model", str(tmp_path)] if sub == "ft" else ["--model-config", str(REPO / "configs/shapes_model")]
        if sub == "train":
            overrides += ["--vae", str(tmp_path)]
        config = parse_config(cls, ["--config", str(REPO / "configs" / name), *overrides], "t")
        assert config.resolution == (512 if name.endswith("_sd.yaml") else 64)
    pipe = LatentDiffusionPipeline.from_config(REPO / "configs/shapes_model")
    x = torch.zeros(1, 4, 16, 16)
    assert pipe.vae.decode(x).sample.shape == (1, 3, 64, 64)
    assert pipe.unet(x, 10, encoder_hidden_states=torch.zeros(1, 77, 128)).sample.shape == (1, 4, 16, 16)


# ----------------------------------------------------------------------------------------- bad input


BAD_FLAGS = [  # (flags, the whole sentence after "error: ")
    (["--mixed-precision", "fp8"], "mixed_precision 'fp8' is not supported; expected one of: no, bf16, fp16."),
    (["--batch-size", "0"], "batch_size must be at least 1, got 0."),
    (["--bogus", "1"], "unrecognized arguments: --bogus 1."),
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'."),
    (["--resume", "/nonexistent"], "--resume /nonexistent: no such checkpoint folder (give a ckpt-XXXXXX folder or 'latest')."),
    (["--batch-size", "100"], "the dataset has 64 images, fewer than one global batch of 100 (batch_size 100 × 1 processes); lower --batch-size."),
    # non-finite floats: argparse and YAML accept nan, inf and 1e999, which pass every range check
    (["--snr-gamma", "nan"], "snr_gamma must be a finite number, got nan."),
    (["--noise-offset", "nan"], "noise_offset must be a finite number, got nan."),
    (["--lr", "inf"], "lr must be a finite number, got inf."),
    (["--lr", "1e999"], "lr must be a finite number, got inf."),
    (["--lr=-inf"], "lr must be a finite number, got -inf."),
    (["--min-lr-ratio", "nan"], "min_lr_ratio must be a finite number, got nan."),
    (["--adam-beta1", "nan"], "adam_beta1 must be a finite number, got nan."),
    (["--adam-epsilon", "inf"], "adam_epsilon must be a finite number, got inf."),
    (["--weight-decay", "inf"], "weight_decay must be a finite number, got inf."),
    (["--max-grad-norm", "nan"], "max_grad_norm must be a finite number, got nan."),
    (["--caption-dropout", "nan"], "caption_dropout must be a finite number, got nan."),
    (["--ema-decay", "nan"], "ema_decay must be a finite number, got nan."),
    (["--lora-alpha", "inf"], "lora_alpha must be a finite number, got inf."),
    (["--validation-guidance", "nan"], "validation_guidance must be a finite number, got nan."),
    # out of range
    (["--adam-beta1", "2"], "adam_beta1 must be in [0, 1), got 2.0."),
    (["--adam-beta2", "1"], "adam_beta2 must be in [0, 1), got 1.0."),
    (["--adam-beta2", "-0.1"], "adam_beta2 must be in [0, 1), got -0.1."),
    (["--adam-epsilon", "0"], "adam_epsilon must be positive, got 0.0."),
    (["--min-lr-ratio", "1.5"], "min_lr_ratio must be between 0 and 1, got 1.5."),
    (["--lr", "0"], "lr must be positive, got 0.0."),
    (["--max-grad-norm", "-1"], "max_grad_norm must not be negative, got -1.0."),
    (["--noise-offset", "-0.1"], "noise_offset must not be negative, got -0.1."),
    (["--caption-dropout", "1.5"], "caption_dropout must be between 0 and 1, got 1.5."),
    (["--ema-decay", "1"], "ema_decay must be in [0, 1), got 1.0."),
    (["--lora-rank", "4", "--lora-alpha", "0"], "lora_alpha must be positive, got 0.0."),
    (["--seed", "-1"], "seed must be between 0 and 4294967295, got -1."),
    (["--seed", "4294967296"], "seed must be between 0 and 4294967295, got 4294967296."),
    (["--validation-seeds", "-1"], "validation_seeds must be between 0 and 4294967295, got -1."),
    (["--validation-prompts", "a", "--validation-seeds"], "validation_prompts are given but validation_seeds is empty; give at least one seed."),
    # counts against their real bound: the schedule has 1000 timesteps, leading spacing, steps_offset 1, and
    # DPM++ 2M asks the schedule for n + 1 of them, so 999 would index timestep 1000
    (["--validation-prompts", "a", "--validation-steps", "1000"], "validation_steps 1000 is more than the dpmpp_2m sampler takes on this model's schedule (1000 training timesteps, steps_offset 1); use at most 998."),
    (["--validation-prompts", "a", "--validation-steps", "999"], "validation_steps 999 is more than the dpmpp_2m sampler takes on this model's schedule (1000 training timesteps, steps_offset 1); use at most 998."),
    (["--validation-prompts", "a", "--validation-steps", "5000"], "validation_steps 5000 is more than the dpmpp_2m sampler takes on this model's schedule (1000 training timesteps, steps_offset 1); use at most 998."),
]


@pytest.mark.parametrize("extra, message", BAD_FLAGS, ids=[" ".join(e) for e, _ in BAD_FLAGS])
def test_bad_flags_exit_2_before_writing(shapes, tiny_config, tiny_vae, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    assert main(unet_args(shapes, tiny_config, tiny_vae, out, *extra)) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not out.exists()


def test_bad_yaml_float_is_refused_like_the_flag(shapes, tiny_config, tiny_vae, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("noise_offset: .nan\nadam_beta1: 0.9\n")
    assert main(["--config", str(cfg), *unet_args(shapes, tiny_config, tiny_vae, tmp_path / "never")]) == 2
    assert capsys.readouterr().err == "error: noise_offset must be a finite number, got nan.\n"
    assert not (tmp_path / "never").exists()


def test_output_dir_that_is_a_file_exits_2(shapes, tiny_config, tiny_vae, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert main(unet_args(shapes, tiny_config, tiny_vae, afile)) == 2
    assert capsys.readouterr().err == f"error: output_dir {afile} is a file, not a folder.\n"
    assert main(unet_args(shapes, tiny_config, tiny_vae, afile / "run")) == 2
    assert capsys.readouterr().err == f"error: cannot write to output_dir {afile / 'run'}: not a directory.\n"
    assert afile.read_text() == "keep me"


def test_bad_yaml_and_data_exit_2(shapes, tiny_config, tiny_vae, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_size: eight\n")
    assert main(["--config", str(cfg), *unet_args(shapes, tiny_config, tiny_vae, tmp_path / "o")]) == 2
    assert "option 'batch_size'" in capsys.readouterr().err
    cfg.write_text("learning_rate: 1\n")
    assert main(["--config", str(cfg)]) == 2
    assert "unknown option 'learning_rate'" in capsys.readouterr().err
    used = tmp_path / "used"
    (used / "checkpoints" / "ckpt-000010").mkdir(parents=True)
    (used / "checkpoints" / "ckpt-000010" / "trainer_state.json").write_text('{"step": 10}')
    assert main(unet_args(shapes, tiny_config, tiny_vae, used)) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(unet_args(empty, tiny_config, tiny_vae, tmp_path / "o")) == 2
    assert "no images found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------- exact resume

# 64 images, batch 8, accumulation 2 → 4 optimiser steps an epoch: step 3 is mid-epoch, 6 is in the next one.
RESUME = ("--train-text-encoder", "--ema-decay", "0.9", "--gradient-accumulation", "2", "--random-flip",
          "--caption-dropout", "0.3", "--noise-offset", "0.05")


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    model = out / "model"
    return {f"{sub}.{k}": v for sub, f in (("unet", "unet/diffusion_pytorch_model.safetensors"),
                                          ("te", "text_encoder/model.safetensors"))
            for k, v in load_file(model / f).items()}


def assert_same_run(a: Path, b: Path) -> float:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert diff < 1e-6, diff
    la, lb = read_log(a), read_log(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], abs=1e-6)
    return diff


def test_k_plus_resume_plus_k_equals_2k(shapes, tiny_config, tiny_vae, tmp_path):
    const = ("--lr-schedule", "constant", "--warmup-steps", "2", *RESUME)
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(unet_args(shapes, tiny_config, tiny_vae, full, "--max-steps", "6", *const)) == 0
    assert main(unet_args(shapes, tiny_config, tiny_vae, split, "--max-steps", "3", "--checkpoint-every", "3", *const)) == 0
    assert main(unet_args(shapes, tiny_config, tiny_vae, split, "--max-steps", "6", "--resume", "latest", *const)) == 0
    print("max parameter difference, 6 steps vs 3 + resume + 3:", assert_same_run(full, split))


@pytest.mark.slow
def test_kill_9_during_save_keeps_previous_checkpoint(shapes, tiny_config, tiny_vae, tmp_path):
    """SIGKILL while ckpt-000006 is being written: ckpt-000003 stays usable, `latest` finds it, the resumed run is exact."""
    import signal
    import subprocess
    import sys
    import time

    from latentdiff.training.run import resolve_resume

    args = ("--max-steps", "6", "--checkpoint-every", "3", *RESUME)  # cosine LR: depends on max_steps
    reference = tmp_path / "reference"
    assert main(unet_args(shapes, tiny_config, tiny_vae, reference, *args)) == 0
    for attempt in range(3):
        run = tmp_path / f"killed{attempt}"
        proc = subprocess.Popen([sys.executable, str(REPO / "scripts/train.py"), *unet_args(shapes, tiny_config, tiny_vae, run, *args)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env())
        tmp = run / "checkpoints" / "ckpt-000006.tmp"
        while proc.poll() is None and not tmp.exists():
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if tmp.exists() and not (run / "checkpoints" / "ckpt-000006").exists():
            break
    else:
        pytest.fail("could not catch the trainer inside a checkpoint save")
    config = parse_config(TrainConfig, unet_args(shapes, tiny_config, tiny_vae, run, "--resume", "latest", *args), "t")
    assert resolve_resume(config).name == "ckpt-000003"
    assert main(unet_args(shapes, tiny_config, tiny_vae, run, "--resume", "latest", *args)) == 0
    assert_same_run(reference, run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-000003", "ckpt-000006"]


# ----------------------------------------------------------------------------------------- LoRA


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory, tiny_config, tiny_vae) -> Path:
    """A diffusers-format folder to fine-tune (random weights: what matters is the layout)."""
    from diffusers import AutoencoderKL

    from latentdiff.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_config(tiny_config, seed=1)
    pipe.vae = AutoencoderKL.from_pretrained(tiny_vae)
    out = tmp_path_factory.mktemp("pretrained") / "model"
    pipe.save_pretrained(out)
    return out


def test_lora_file_loads_in_diffusers_with_the_same_output(shapes, tiny_pretrained, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from latentdiff import text
    from latentdiff.pipeline import load_pipeline

    out = tmp_path / "lora"
    assert main(["--model", str(tiny_pretrained), "--data", str(shapes), "--output-dir", str(out), "--resolution", "32",
                 "--batch-size", "8", "--num-workers", "0", "--max-steps", "3", "--lr", "1e-2", "--checkpoint-every", "0",
                 "--lora-rank", "4", "--lora-alpha", "8", "--lora-text-encoder", "--export-single-file"]) == 0
    path = out / "pytorch_lora_weights.safetensors"
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("unet.") and "to_q.lora_A" in k for k in keys)
    assert any(k.startswith("text_encoder.") and "q_proj.lora_B" in k for k in keys)

    ours = load_pipeline(tiny_pretrained, device="cpu", precision="fp32")
    theirs = StableDiffusionPipeline.from_pretrained(tiny_pretrained, safety_checker=None)
    ids = text.tokenize(ours.tokenizer, ["a red circle on a white background"])
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])

    def eps(pipe):
        with torch.no_grad():
            return pipe.unet(x, t, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample

    base = eps(ours)
    ours.load_lora(path, scale=1.0)
    theirs.load_lora_weights(str(path))
    mine, reference = eps(ours), eps(theirs)
    assert (mine - base).abs().max() > 1e-4  # the adapters were trained
    torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-5)
    off = load_pipeline(tiny_pretrained, device="cpu", precision="fp32")
    off.load_lora(path, scale=0.0)
    torch.testing.assert_close(eps(off), base)  # the scale reaches both the UNet and the text encoder adapters

    # --export-single-file: the same adapters in kohya's layout (A1111, ComfyUI), read back by diffusers and latentdiff
    kohya = out / "lora.safetensors"
    with safe_open(kohya, "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in keys) and alphas == {8.0}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "8"
    from_kohya = load_pipeline(tiny_pretrained, device="cpu", precision="fp32")
    from_kohya.load_lora(kohya)
    torch.testing.assert_close(eps(from_kohya), mine, atol=1e-5, rtol=1e-5)
    theirs_kohya = StableDiffusionPipeline.from_pretrained(tiny_pretrained, safety_checker=None)
    theirs_kohya.load_lora_weights(str(kohya))
    torch.testing.assert_close(eps(theirs_kohya), mine, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- distributed


@pytest.mark.slow
def test_two_processes_train_on_disjoint_shards(shapes, tiny_config, tiny_vae, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on the CPU: gloo DDP, one shard a process, a loadable result."""
    import subprocess
    import sys

    from latentdiff.pipeline import load_pipeline
    from latentdiff.training.run import ShardedEpochSampler

    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", str(REPO / "scripts/train.py")]
    args = unet_args(shapes, tiny_config, tiny_vae, out, "--batch-size", "4", "--max-steps", "3", "--log-indices",
                     "--train-text-encoder", "--checkpoint-every", "2")
    res = subprocess.run([*launch, *args], capture_output=True, text=True, timeout=300,
                         env=subprocess_env())
    assert res.returncode == 0, res.stderr[-3000:]
    seen = {r: [json.loads(line)["indices"] for line in (out / f"data-rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    for step in range(3):
        a, b = set(seen[0][step]), set(seen[1][step])
        assert len(a) == len(b) == 4 and not a & b
        assert a | b == set(ShardedEpochSampler(64, 8, 0).batch(step))  # together: the 1-process batch of 8
    assert {p.name for p in (out / "checkpoints" / "ckpt-000002").iterdir()} == CHECKPOINT_FILES | {"rng-1.json", "rng-1.safetensors"}
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]
    pipe = load_pipeline(out / "model", device="cpu", precision="fp32")
    assert pipe(["a red circle"], num_inference_steps=2, seed=[0], output_type="numpy", progress=False).images.shape == (1, 32, 32, 3)


# ----------------------------------------------------------------------------------------- export


def test_fine_tune_exports_for_diffusers_and_as_single_file(shapes, tiny_pretrained, tmp_path):
    from diffusers import StableDiffusionPipeline

    from latentdiff.pipeline import load_pipeline

    out = tmp_path / "ft"
    assert main(["--model", str(tiny_pretrained), "--data", str(shapes), "--output-dir", str(out), "--resolution", "32",
                 "--batch-size", "8", "--num-workers", "0", "--max-steps", "2", "--lr", "1e-3", "--checkpoint-every", "0",
                 "--prediction-type", "v_prediction", "--gradient-checkpointing", "--no-cache-latents",
                 "--export-single-file"]) == 0
    folder = load_pipeline(out / "model", device="cpu", precision="fp32")
    assert folder.schedule.prediction_type == "v_prediction"
    theirs = StableDiffusionPipeline.from_pretrained(out / "model", safety_checker=None)
    assert theirs.scheduler.config.prediction_type == "v_prediction"
    single = load_pipeline(out / "model.safetensors", device="cpu", precision="fp32")
    base = load_pipeline(tiny_pretrained, device="cpu", precision="fp32")
    for name in ("unet", "text_encoder", "vae"):
        ours = getattr(folder, name).state_dict()
        for other in (getattr(theirs, name).state_dict(), getattr(single, name).state_dict()):
            assert all(torch.equal(v, other[k]) for k, v in ours.items())
    moved = [k for k, v in folder.unet.state_dict().items() if not torch.equal(v, base.unet.state_dict()[k])]
    assert moved and folder.text_encoder.state_dict().keys() == base.text_encoder.state_dict().keys()
    assert all(torch.equal(v, base.text_encoder.state_dict()[k]) for k, v in folder.text_encoder.state_dict().items())  # frozen


# ----------------------------------------------------------------------------------------- learning


def test_loss_falls_and_samples_move_toward_the_training_set(tiny_config, tiny_vae, tmp_path):
    from latentdiff.data import load_pixels, make_shapes, scan_captioned_images
    from latentdiff.pipeline import LatentDiffusionPipeline, load_pipeline

    data, out = tmp_path / "eight", tmp_path / "learn"
    make_shapes(data, 8, size=32)
    assert main(unet_args(data, tiny_config, tiny_vae, out, "--max-steps", "60", "--lr-schedule", "constant",
                          "--warmup-steps", "5", "--caption-dropout", "0")) == 0
    losses = [r["loss"] for r in read_log(out)]
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10]), losses

    items = scan_captioned_images(data)
    trained = load_pipeline(out / "model", device="cpu", precision="fp32")
    untrained = LatentDiffusionPipeline.from_config(tiny_config, seed=0)  # the run's starting weights
    untrained.vae = trained.vae
    with torch.no_grad():
        x0 = trained.vae.encode(torch.stack([load_pixels(p, 32) for p, _ in items])).latent_dist.mean
    x0 = x0.flatten(1) * trained.vae.config.scaling_factor  # (8, 256)

    def distance_to_training_set(pipe) -> float:
        z = pipe([t for _, t in items], num_inference_steps=20, guidance_scale=1.0, seed=list(range(8)),
                 output_type="latents", progress=False).images.flatten(1)
        return torch.cdist(z, x0).min(dim=1).values.mean().item()  # mean nearest-neighbour distance

    assert distance_to_training_set(trained) < 0.5 * distance_to_training_set(untrained)


def test_v_prediction_fine_tune_learns_v(tiny_config, tiny_vae, tmp_path):
    """60 steps of `--prediction-type v_prediction` on 8 images: the loss falls, and the model predicts the velocity
    √ᾱ·ε − √(1−ᾱ)·x_0 (diffusers' DDPMScheduler.get_velocity) much better than before, and better than it predicts ε."""
    from diffusers import AutoencoderKL, DDPMScheduler

    from latentdiff import text
    from latentdiff.data import load_pixels, make_shapes, scan_captioned_images
    from latentdiff.pipeline import LatentDiffusionPipeline

    data, out = tmp_path / "eight", tmp_path / "learn"
    make_shapes(data, 8, size=32)
    items = scan_captioned_images(data)
    pixels = torch.stack([load_pixels(p, 32) for p, _ in items])
    # a pretrained-like start: a near-deterministic VAE posterior (std e^-10, as SD's VAE is nearly deterministic)
    # and a scaling factor giving unit-variance latents. The 4-step tiny VAE's posterior std is ~1: its latents
    # are mostly noise, and v = √ᾱ·ε − √(1−ᾱ)·x_0 of pure-noise x_0 is uncorrelated with x_t, so nothing is learnable.
    pipe = LatentDiffusionPipeline.from_config(tiny_config, seed=1)
    pipe.vae = AutoencoderKL.from_pretrained(tiny_vae)
    with torch.no_grad():
        pipe.vae.quant_conv.weight[4:] = 0
        pipe.vae.quant_conv.bias[4:] = -20.0
        pipe.vae.register_to_config(scaling_factor=1.0 / pipe.vae.encode(pixels).latent_dist.mean.std().item())
    pipe.save_pretrained(tmp_path / "pretrained")

    assert main(["--model", str(tmp_path / "pretrained"), "--data", str(data), "--output-dir", str(out),
                 "--resolution", "32", "--batch-size", "8", "--num-workers", "0", "--log-every", "1", "--lr", "1e-3",
                 "--checkpoint-every", "0", "--max-steps", "60", "--lr-schedule", "constant", "--warmup-steps", "5",
                 "--caption-dropout", "0", "--prediction-type", "v_prediction"]) == 0
    losses = [r["loss"] for r in read_log(out)]
    assert sum(losses[-10:]) < 0.75 * sum(losses[:10]), losses

    reference = DDPMScheduler.from_config(pipe.schedule.to_diffusers())

    def errors(folder) -> tuple[float, float]:
        """(MSE to v, MSE to ε) of the model's output on the training images at t = 100, 300, …, 900."""
        model = LatentDiffusionPipeline.from_pretrained(folder, device="cpu", precision="fp32")
        gen, v_err, eps_err = torch.Generator().manual_seed(0), 0.0, 0.0
        with torch.no_grad():
            x0 = model.vae.encode(pixels).latent_dist.mean * model.vae.config.scaling_factor
            context = model.text_encoder(text.tokenize(model.tokenizer, [c for _, c in items]))[0]
            for step in (100, 300, 500, 700, 900):
                noise, t = torch.randn(x0.shape, generator=gen), torch.full((len(items),), step)
                pred = model.unet(reference.add_noise(x0, noise, t), t, encoder_hidden_states=context).sample
                v_err += (pred - reference.get_velocity(x0, noise, t)).pow(2).mean().item() / 5
                eps_err += (pred - noise).pow(2).mean().item() / 5
        assert model.schedule.prediction_type == ("v_prediction" if folder == out / "model" else "epsilon")
        return v_err, eps_err

    (v_before, _), (v_after, eps_after) = errors(tmp_path / "pretrained"), errors(out / "model")
    assert v_after < 0.7 * v_before and v_after < 0.85 * eps_after, (v_before, v_after, eps_after)


@pytest.mark.parametrize("cache", ["--cache-latents", "--no-cache-latents"])
def test_corrupt_image_is_skipped_and_reported(tiny_config, tiny_vae, tmp_path, capsys, cache):
    from latentdiff.data import make_shapes

    data = tmp_path / "data"
    make_shapes(data, 16, size=32)
    bad = sorted(data.glob("*.png"))[3]
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    assert main(unet_args(data, tiny_config, tiny_vae, tmp_path / "run", "--max-steps", "2", cache)) == 0
    assert f"skipped 1 unreadable image(s): {bad}" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------- pieces


def test_sampler_epochs_shards_and_augmentation(shapes):
    from latentdiff.data import CaptionedImageDataset, collate_skip_none, scan_captioned_images
    from latentdiff.training.run import ShardedEpochSampler, make_loader

    s = ShardedEpochSampler(10, 3, seed=0)  # 3 batches an epoch, image 10 of each epoch dropped
    epoch0, epoch1 = [i for k in range(3) for i in s.batch(k)], [i for k in range(3, 6) for i in s.batch(k)]
    assert len(set(epoch0)) == len(set(epoch1)) == 9 and epoch0 != epoch1
    items = scan_captioned_images(shapes)[:4]
    dataset = CaptionedImageDataset(items, 32, random_flip=True, seed=0)
    batches = iter(make_loader(dataset, ShardedEpochSampler(4, 4, seed=0), 0, collate_skip_none))
    pixels = {}
    for epoch in range(4):  # each epoch is a single batch holding all 4 images
        batch = next(batches)
        for i, x in zip(batch["index"], batch["pixel_values"]):
            pixels.setdefault(i, []).append(x)
    flipped = [[not torch.equal(p[0], p[e]) for e in range(1, 4)] for p in pixels.values()]
    assert any(any(f) for f in flipped)  # the flip is redrawn every epoch


# ----------------------------------------------------------------------------------------- safety: NaN, pickles, disk


def nan_at(monkeypatch, call: int, *, weights_only: bool = False):
    """Make the loss NaN from its `call`-th evaluation on (1-based); with weights_only the loss stays finite but
    its gradient is NaN (0·√0 has derivative 0·∞), which only the weights then show."""
    from latentdiff.training import trainer

    real, calls = trainer.diffusion_loss, [0]

    def loss(pred, *args, **kwargs):
        calls[0] += 1
        value = real(pred, *args, **kwargs)
        if calls[0] < call:
            return value
        if weights_only:
            return value + 0.0 * torch.sqrt((pred * 0).sum())
        return value * float("nan")

    monkeypatch.setattr(trainer, "diffusion_loss", loss)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(shapes, tiny_config, tiny_vae, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = unet_args(shapes, tiny_config, tiny_vae, out, "--max-steps", "6", "--checkpoint-every", "2", "--log-every", "5")
    nan_at(monkeypatch, 3)  # step 3 is neither a log nor a checkpoint step: found at step 4, before its checkpoint
    assert main(args) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (f"error: the loss or its gradient became NaN/inf at step 3, so training stopped without saving; the last "
                   f"good checkpoint, {out / 'checkpoints' / 'ckpt-000002'}, is kept — lower --lr (now 0.001) and --resume it.")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-000002"]
    assert not (out / "model").exists() and not leftovers(out)
    monkeypatch.undo()
    assert main([*args, "--resume", "latest"]) == 0  # the kept checkpoint is good
    assert [r["step"] for r in read_log(out)] == [5, 6]


def test_nan_weights_behind_a_finite_loss_are_never_saved(shapes, tiny_config, tiny_vae, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    nan_at(monkeypatch, 2, weights_only=True)  # the last step; no clipping, so no gradient norm is looked at
    assert main(unet_args(shapes, tiny_config, tiny_vae, out, "--max-steps", "2", "--max-grad-norm", "0")) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"error: the weights became NaN/inf by step 2, so {out / 'model'} was not written;")
    assert [r["step"] for r in read_log(out)] == [1, 2] and all(math.isfinite(r["loss"]) for r in read_log(out))
    assert not (out / "model").exists() and not leftovers(out)


def test_huge_lr_diverges_with_an_error_not_a_nan_model(shapes, tiny_config, tiny_vae, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(unet_args(shapes, tiny_config, tiny_vae, out, "--max-steps", "4", "--lr", "1e30", "--max-grad-norm", "0",
                          "--lr-schedule", "constant")) == 1
    assert "became NaN/inf" in capsys.readouterr().err
    assert not (out / "model").exists()


@pytest.mark.parametrize("cache", ["--cache-latents", "--no-cache-latents"])
def test_a_dataset_of_unreadable_images_is_an_error(tiny_config, tiny_vae, tmp_path, capsys, cache):
    from latentdiff.data import make_shapes

    data = tmp_path / "data"
    make_shapes(data, 8, size=32)
    for png in data.glob("*.png"):
        png.write_bytes(png.read_bytes()[:100])  # truncated
    out = tmp_path / "run"
    assert main(unet_args(data, tiny_config, tiny_vae, out, "--max-steps", "2", cache)) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: none of the 8 images in {data} can be read (see the warnings above); nothing to train on.")
    assert not (out / "model").exists()


def test_torn_log_line_does_not_block_resume(shapes, tiny_config, tiny_vae, tmp_path):
    out = tmp_path / "run"
    assert main(unet_args(shapes, tiny_config, tiny_vae, out, "--max-steps", "2", "--checkpoint-every", "2")) == 0
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.9')  # what a kill or a full disk leaves mid-line
    assert main(unet_args(shapes, tiny_config, tiny_vae, out, "--max-steps", "3", "--resume", "latest")) == 0
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]


class Payload:
    """A pickle whose loading runs a shell command (what a crafted checkpoint file carries)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# every pickle file accelerate's save_state wrote (latentdiff's checkpoint format 1) or can write
ACCELERATE_PICKLES = ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin", "sampler.bin",
                      "scaler.pt", "pytorch_model.bin", "dl_state_dict.bin"]


def test_checkpoints_hold_no_pickles_and_crafted_ones_never_run(shapes, tiny_config, tiny_vae, tmp_path, capsys):
    import pickle
    import shutil

    out = tmp_path / "run"
    args = unet_args(shapes, tiny_config, tiny_vae, out, "--max-steps", "2", "--checkpoint-every", "2", "--ema-decay", "0.9")
    assert main(args) == 0
    ckpt = out / "checkpoints" / "ckpt-000002"
    files = {p.name for p in ckpt.iterdir()}
    assert files == CHECKPOINT_FILES | {"ema.json", "ema.safetensors"}
    for f in ckpt.iterdir():  # not a pickle (protocol 2+ starts with 0x80) nor torch.save's zip of one
        assert f.read_bytes()[:2] not in (b"PK",) and f.read_bytes()[:1] != b"\x80", f

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    torch.save(Payload(marker), evil)  # the form accelerate's files have
    torch.load(evil, weights_only=False)  # the payload is live: loading it unsafely runs it
    assert marker.exists()
    marker.unlink()

    # 1. beside this version's files, under every name accelerate used: ignored, never opened
    for name in ACCELERATE_PICKLES:
        shutil.copy(evil, ckpt / name)
    assert main([*args, "--max-steps", "3", "--checkpoint-every", "0", "--resume", "latest"]) == 0
    assert not marker.exists()

    # 2. a checkpoint of format 1 (accelerate's pickles): refused up front with one sentence
    legacy = tmp_path / "legacy"
    shutil.copytree(ckpt, legacy)
    state = json.loads((legacy / "trainer_state.json").read_text())
    (legacy / "trainer_state.json").write_text(json.dumps({**state, "format": "latentdiff-trainer-1"}))
    capsys.readouterr()
    assert main(unet_args(shapes, tiny_config, tiny_vae, tmp_path / "fresh", "--max-steps", "3", "--ema-decay", "0.9",
                          "--resume", str(legacy))) == 2
    assert capsys.readouterr().err == (
        f"error: cannot resume from {legacy}: it was written by an older latentdiff whose checkpoints hold pickles, which "
        "can run code when loaded and are never loaded now; start the run afresh.\n")
    assert not (tmp_path / "fresh").exists() and not marker.exists()

    # 3. the crafted pickle in place of each file this version writes: refused with one sentence naming the file
    other = tmp_path / "other"  # one output folder for all (its latent cache is built once)
    for name in sorted(files - {"trainer_state.json"}):
        broken = tmp_path / f"broken-{name}"
        shutil.copytree(ckpt, broken)
        for extra in ACCELERATE_PICKLES:
            (broken / extra).unlink()
        (broken / name).write_bytes(pickle.dumps(Payload(marker)))
        assert main(unet_args(shapes, tiny_config, tiny_vae, other, "--max-steps", "3", "--ema-decay", "0.9",
                              "--resume", str(broken))) == 2, name
        err = capsys.readouterr().err.splitlines()
        assert err[-1].startswith(f"error: cannot resume from {broken}: {broken / name} is not ") and err[-1].endswith("."), err
        assert not marker.exists(), name


@pytest.mark.parametrize("action", ["checkpoint", "model"])
def test_full_disk_is_one_sentence_and_leaves_no_temporaries(shapes, tiny_config, tiny_vae, tmp_path, capsys, action):
    """A 1 MB file-size limit (SIGXFSZ ignored, so writes fail with EFBIG as on a full disk): the checkpoint (9.6 MB)
    or the model (UNet 3.2 MB) cannot be written; exit 1 with one sentence, no .tmp left, and a later run cleans up."""
    out = tmp_path / "run"
    args = unet_args(shapes, tiny_config, tiny_vae, out, "--max-steps", "2",
                     "--checkpoint-every", "2" if action == "checkpoint" else "0")
    capsys.readouterr()
    with file_size_limit(1 << 20):
        rc = main(args)
    err = capsys.readouterr().err
    target = {"checkpoint": f"save checkpoint {out / 'checkpoints' / 'ckpt-000002'}", "model": f"save the model to {out / 'model'}"}
    assert rc == 1, err[-3000:]
    assert err.splitlines()[-1] == f"error: cannot {target[action]}: file too large.", err[-3000:]
    assert "Traceback" not in err
    assert not (out / "model").exists() and not leftovers(out)
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())

    # what a kill mid-write leaves is cleared at the next start
    planted = [out / "checkpoints" / "ckpt-000009.tmp", out / "model.tmp", out / ".log.jsonl.4242.tmp",
               out / "validation" / ".step-000002.png.4242.tmp"]
    for p in planted:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.mkdir() if p.suffix == ".tmp" and not p.name.startswith(".") else p.write_text("x")
    assert main(args) == 0
    assert not leftovers(out) and (out / "model").is_dir()


def test_state_files_round_trip_exactly_and_hold_only_data(tmp_path):
    from latentdiff.training.state import StateError, load_state, save_state

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    base = torch.arange(12.0)
    state = {"optimizer": opt.state_dict(), "shared": [base, base[:6]], "strided": base.view(3, 4).t(),
             "flags": (True, None, "x", float("nan"), float("-inf"), 2**40)}
    files = save_state(tmp_path, "s", state)
    assert sorted(p.name for p in files) == ["s.json", "s.safetensors"]
    back = load_state(tmp_path, "s")
    assert back["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]  # betas stay a tuple, keys stay ints
    assert back["optimizer"]["state"].keys() == opt.state_dict()["state"].keys() == {0, 1}
    for i, entry in opt.state_dict()["state"].items():
        assert all(torch.equal(v, back["optimizer"]["state"][i][k]) for k, v in entry.items())
    assert torch.equal(back["shared"][1], base[:6]) and torch.equal(back["strided"], base.view(3, 4).t())
    flags = back["flags"]
    assert flags[:3] == (True, None, "x") and math.isnan(flags[3]) and flags[4] == -math.inf and flags[5] == 2**40
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])

    (tmp_path / "s.json").write_text(json.dumps({"format": "latentdiff-state-1", "state": {"__object__": "os.system"}}))
    with pytest.raises(StateError, match="is damaged"):
        load_state(tmp_path, "s")
