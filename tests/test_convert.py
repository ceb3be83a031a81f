"""`latentdiff convert`: folder ↔ single file bit for bit in fp32, EMA weights, LoRA to kohya, bad input."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import random_lora_file
from latentdiff.cli import main


def _folder_tensors(folder):
    return {f"{sub}/{k}": v for sub in ("unet", "vae", "text_encoder")
            for f in (folder / sub).glob("*.safetensors") for k, v in load_file(f).items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_folder_to_file_and_back_is_bit_exact_in_fp32(tiny_model_dir, tmp_path, capsys):
    file, folder, file2 = tmp_path / "m.safetensors", tmp_path / "back", tmp_path / "m2.safetensors"
    assert main(["convert", str(tiny_model_dir), str(file)]) == 0
    assert "wrote an original-layout single file" in capsys.readouterr().out
    assert main(["convert", str(file), str(folder)]) == 0
    assert _same(_folder_tensors(folder), _folder_tensors(tiny_model_dir))
    assert main(["convert", str(folder), str(file2)]) == 0
    assert _same(load_file(file2), load_file(file))
    # an existing destination needs --force, and is then replaced whole
    assert main(["convert", str(folder), str(file2), "--dtype", "fp16"]) == 2
    assert "exists; pass --force to replace it" in capsys.readouterr().err
    assert main(["convert", str(folder), str(file2), "--dtype", "fp16", "--force"]) == 0
    assert {v.dtype for v in load_file(file2).values()} == {torch.float16}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_ema_weights_of_a_training_checkpoint(tiny_model_dir, tmp_path):
    """LDM keeps the UNet's EMA as model_ema.<key without dots>; --ema converts those weights."""
    file, ema_file = tmp_path / "m.safetensors", tmp_path / "ema.safetensors"
    assert main(["convert", str(tiny_model_dir), str(file)]) == 0
    state = load_file(file)
    unet = [k for k in state if k.startswith("model.diffusion_model.")]
    ema = {"model_ema." + k[len("model."):].replace(".", ""): state[k] + 1 for k in unet}
    with safe_open(file, "pt") as f:
        metadata = f.metadata()  # the tiny model's configs
    save_file(state | ema, ema_file, metadata=metadata)
    assert main(["convert", str(ema_file), str(tmp_path / "raw")]) == 0
    assert main(["convert", str(ema_file), str(tmp_path / "ema"), "--ema"]) == 0
    raw, averaged = _folder_tensors(tmp_path / "raw"), _folder_tensors(tmp_path / "ema")
    key = "unet/conv_in.weight"
    torch.testing.assert_close(averaged[key], raw[key] + 1)
    assert _same({k: v for k, v in raw.items() if not k.startswith("unet/")},
                 {k: v for k, v in averaged.items() if not k.startswith("unet/")})
    assert main(["convert", str(file), str(tmp_path / "none"), "--ema"]) == 2


def test_lora_to_kohya_loads_to_the_same_output(tiny_model_dir, tmp_path):
    from latentdiff import text
    from latentdiff.pipeline import load_pipeline

    peft_file = random_lora_file(tiny_model_dir, tmp_path / "style.safetensors", seed=3, text_encoder=True)
    kohya = tmp_path / "style_kohya.safetensors"
    assert main(["convert", str(peft_file), str(kohya)]) == 0
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in load_file(kohya))

    def eps(path):
        pipe = load_pipeline(tiny_model_dir, device="cpu", precision="fp32")
        pipe.load_lora(path, scale=0.9)
        ids = text.tokenize(pipe.tokenizer, ["a red circle"])
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return pipe.unet(x, torch.tensor([400]), encoder_hidden_states=pipe.text_encoder(ids)[0]).sample

    torch.testing.assert_close(eps(kohya), eps(peft_file), atol=1e-5, rtol=1e-5)
    assert main(["convert", str(kohya), str(tmp_path / "again.safetensors")]) == 2


@pytest.mark.parametrize("args, message", [
    (["MISSING", "OUT/x.safetensors"], "does not exist; expected a diffusers folder"),
    (["MODEL", "OUT/x.ckpt"], ".ckpt files are read, never written"),
    (["MODEL", "OUT/folder"], "a model folder converts to one .safetensors file"),
    (["MODEL", "OUT/x.safetensors", "--ema"], "--ema picks the EMA weights of a single-file training checkpoint"),
    (["MODEL", "OUT/nowhere/x.safetensors"], "its folder does not exist"),
    (["JUNK", "OUT/folder"], "is not a readable checkpoint"),
])
def test_bad_input_is_one_sentence_and_writes_nothing(tiny_model_dir, tmp_path, capsys, args, message):
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    (tmp_path / "out").mkdir()
    names = {"MISSING": str(tmp_path / "missing"), "MODEL": str(tiny_model_dir), "JUNK": str(tmp_path / "junk.ckpt")}
    args = [names.get(a, a.replace("OUT", str(tmp_path / "out"))) for a in args]
    assert main(["convert", *args]) == 2
    assert message in capsys.readouterr().err
    assert not list((tmp_path / "out").iterdir())
