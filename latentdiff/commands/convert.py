"""`latentdiff convert SRC DST`: a model between a diffusers folder and an original single file, or a LoRA from
the diffusers/peft layout (latentdiff's training output) to kohya's (A1111, ComfyUI)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UsageError

DTYPES = ("fp16", "bf16", "fp32")
LORA_MARKS = ("lora_unet_", "lora_te", ".lora_A.", ".lora_down.", ".lora.down.")  # lora_te_, SDXL's lora_te1_/2_


def _torch_dtype(name: str | None):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name] if name else None


def _stored_dtype(tensors: dict):
    """The dtype most of a file's floating-point weights have: what a conversion keeps unless --dtype says."""
    from collections import Counter

    counts = Counter(t.dtype for t in tensors.values() if t.is_floating_point())
    return counts.most_common(1)[0][0] if counts else None


def _is_lora(keys) -> bool:
    return any(mark in k for k in keys for mark in LORA_MARKS)


def folder_to_file(src: Path, dst: Path, dtype) -> str:
    from safetensors.torch import load_file

    from ..checkpoints import save_single_file
    from ..pipeline import LatentDiffusionPipeline

    unet_file = next((src / "unet").glob("*.safetensors"), None)
    stored = _stored_dtype(load_file(unet_file)) if unet_file else None
    pipe = LatentDiffusionPipeline.from_pretrained(src, device="cpu", precision="fp32")
    save_single_file(dst, pipe.unet, pipe.vae, pipe.text_encoder, text_encoder_2=pipe.text_encoder_2, dtype=dtype or stored,
                     schedule=pipe.schedule)
    return "an original-layout single file"


def file_to_folder(src: Path, dst: Path, dtype, ema: bool) -> str:
    from ..checkpoints import read_state_dict
    from ..pipeline import LatentDiffusionPipeline

    stored = _stored_dtype({k: v for k, v in read_state_dict(src).items() if k.startswith("model.diffusion_model.")})
    pipe = LatentDiffusionPipeline.from_single_file(src, device="cpu", precision="fp32", ema=ema)
    pipe.save_pretrained(dst, dtype=dtype or stored)
    return "a diffusers folder" + (" (EMA UNet)" if ema else "")


def _lora_family(layers: dict) -> str:
    """The base model a diffusers-layout LoRA is for, from its layers: SDXL with adapters on bigG (text_encoder_2) or
    a 2048-wide cross-attention context, SD 2.x with a 1024-wide one (OpenCLIP ViT-H), else SD 1.x."""
    if any(k.startswith("text_encoder_2.") for k in layers):
        return "sdxl"
    widths = {v.shape[1] for k, v in layers.items() if k.startswith("unet.") and ".attn2.to_k.lora_A." in k}
    return "sdxl" if 2048 in widths else "sd2" if 1024 in widths else "sd1"


def convert_lora(src: Path, dst: Path, dtype) -> str:
    """A diffusers/peft-layout LoRA (latentdiff's training output) → kohya's layout, α per component kept."""
    from diffusers import StableDiffusionPipeline

    from ..checkpoints.lora_layout import save_kohya_lora

    layers, _, metadata = StableDiffusionPipeline.lora_state_dict(str(src.parent), weight_name=src.name,
                                                                  return_lora_metadata=True)
    layers = {k: v.to(dtype or v.dtype) for k, v in layers.items()}
    ranks = {k.split(".")[0]: v.shape[0] for k, v in layers.items() if k.endswith("lora_A.weight")}
    # the LoraConfig travels in the metadata (keys prefixed by component); without it peft's α is the rank
    alpha = {name: (metadata or {}).get(f"{name}.lora_alpha", rank) for name, rank in ranks.items()}
    save_kohya_lora(dst, layers, alpha, rank=ranks.get("unet", next(iter(ranks.values()))), family=_lora_family(layers))
    return "a kohya-layout LoRA"


def check(args) -> str:
    """What SRC is: "folder", "file" or "lora"; UsageError before anything is written."""
    from ..checkpoints import CheckpointError, read_state_dict

    src, dst = args.src, args.dst
    if not src.exists():
        raise UsageError(f"{src} does not exist; expected a diffusers folder, a .safetensors/.ckpt model or a LoRA file")
    if dst.exists() and not args.force:
        raise UsageError(f"{dst} exists; pass --force to replace it")
    if not dst.resolve().parent.is_dir():
        raise UsageError(f"cannot write {dst}: its folder does not exist")
    if dst.suffix.lower() == ".ckpt":
        raise UsageError(f"{dst}: .ckpt files are read, never written (a pickle); write .safetensors")
    if src.is_dir():
        if not (src / "unet").is_dir():
            raise UsageError(f"{src} is a folder without unet/; expected a diffusers-format model folder")
        if dst.suffix.lower() != ".safetensors":
            raise UsageError(f"a model folder converts to one .safetensors file; {dst} does not end in .safetensors")
        if args.ema:
            raise UsageError("--ema picks the EMA weights of a single-file training checkpoint; a folder has one UNet")
        return "folder"
    try:
        state = read_state_dict(src)
    except CheckpointError as e:
        raise UsageError(str(e).rstrip(".")) from None
    if _is_lora(state):
        if any(k.startswith(("lora_unet_", "lora_te")) for k in state):
            raise UsageError(f"{src} is already in kohya's layout, which A1111, ComfyUI, diffusers and latentdiff "
                             "all load as it is")
        if dst.suffix.lower() != ".safetensors":
            raise UsageError(f"a LoRA converts to a .safetensors file; {dst} does not end in .safetensors")
        if args.ema:
            raise UsageError("--ema applies to model checkpoints, not to a LoRA")
        return "lora"
    if dst.suffix:
        raise UsageError(f"a single-file model converts to a diffusers folder; {dst} looks like a file name")
    return "file"


def main(argv: list[str]) -> int:
    """`latentdiff convert SRC DST`; 0 on success, 2 (one sentence) on bad input, with nothing written."""
    parser = argparse.ArgumentParser(prog="latentdiff convert", description=main.__doc__)
    parser.add_argument("src", type=Path, help="a diffusers folder, an SD .safetensors/.ckpt file, or a LoRA file")
    parser.add_argument("dst", type=Path, help="the .safetensors file or folder to write")
    parser.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: the source's dtype)")
    parser.add_argument("--ema", action="store_true", help="a training checkpoint's EMA UNet weights (model_ema.*)")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists (atomically)")
    args = parser.parse_args(argv)
    from ..checkpoints import CheckpointError

    try:
        kind = check(args)
        dtype = _torch_dtype(args.dtype)
        if kind == "folder":
            what = folder_to_file(args.src, args.dst, dtype)
        elif kind == "file":
            what = file_to_folder(args.src, args.dst, dtype, args.ema)
        else:
            what = convert_lora(args.src, args.dst, dtype)
    except (UsageError, CheckpointError) as e:
        print(f"latentdiff convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {what} to {args.dst}")
    return 0
