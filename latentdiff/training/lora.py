"""Training LoRA adapters (Hu et al. 2021) through peft: W x + (α/r)·B A x on the attention projections.

Files are written in the layout diffusers' `StableDiffusion(XL)Pipeline.load_lora_weights` reads:
`unet.<module>.lora_A.weight` / `lora_B.weight` (+ `text_encoder.…`, SDXL's `text_encoder_2.…`), with the peft
LoraConfig (rank, alpha, targets) in the safetensors metadata so α ≠ r survives the round trip; latentdiff.adapters
loads them for inference. `save_kohya` writes the same adapters in the layout A1111 and ComfyUI read.
"""
from __future__ import annotations

from pathlib import Path

import torch

from latentdiff.files import atomic_path

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers Attention projections
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP attention
ADAPTER = "default"


def _lora_config(rank: int, alpha: float | None, targets: list[str]):
    from peft import LoraConfig

    # gaussian A, zero B: training starts from exactly the base model
    return LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets)


def add_lora(unet, text_encoders, rank: int, alpha: float | None = None, *, seed: int = 0) -> None:
    """Attach trainable adapters (the only parameters left with requires_grad) to the UNet and each of
    `text_encoders` (none: the UNet only). peft draws A from the global generator: seeded here, so the adapters are
    a function of `seed`, not of whatever drew from it before (training/run.py's rule 1)."""
    with torch.random.fork_rng(devices=[]):  # the models are on the CPU; the caller's generator is left as it was
        torch.manual_seed(seed)
        unet.add_adapter(_lora_config(rank, alpha, UNET_TARGETS), adapter_name=ADAPTER)
        for encoder in text_encoders:
            encoder.add_adapter(_lora_config(rank, alpha, TEXT_ENCODER_TARGETS), adapter_name=ADAPTER)


def _layers(unet, text_encoders: dict) -> dict:
    """{component name: peft's state dict of its adapter}, the UNet first; `text_encoders` by diffusers' names."""
    from peft.utils import get_peft_model_state_dict

    return {name: get_peft_model_state_dict(model, adapter_name=ADAPTER)
            for name, model in {"unet": unet, **text_encoders}.items()}


def save_lora(path, unet, text_encoders: dict) -> Path:
    """One safetensors file, written to a temporary folder then renamed into place; `text_encoders` by diffusers'
    component names ("text_encoder", SDXL's "text_encoder_2"), those that carry adapters."""
    from diffusers import StableDiffusionXLPipeline

    path = Path(path)
    models = {"unet": unet, **text_encoders}
    # peft's own key names (lora_A / lora_B): the layout diffusers' loaders read natively. SDXL's writer is SD's with
    # text_encoder_2 added: an SD 1.x/2.x LoRA comes out the same
    kwargs = {f"{name}_lora_layers": layers for name, layers in _layers(unet, text_encoders).items()}
    kwargs |= {f"{name}_lora_adapter_metadata": model.peft_config[ADAPTER].to_dict() for name, model in models.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, durable=True) as tmp:  # diffusers writes into a folder under a name of our choosing
        StableDiffusionXLPipeline.save_lora_weights(tmp.parent, weight_name=tmp.name, safe_serialization=True, **kwargs)
    return path


def save_kohya(path, unet, text_encoders: dict, family: str) -> Path:
    """The same adapters in kohya's layout (checkpoints/lora_layout.py) for a model of `family` ("sd1", "sd2",
    "sdxl"), the file A1111 and ComfyUI load."""
    from latentdiff.checkpoints.lora_layout import save_kohya_lora

    state = {f"{name}.{k}": v for name, layers in _layers(unet, text_encoders).items() for k, v in layers.items()}
    alpha = {name: model.peft_config[ADAPTER].lora_alpha for name, model in {"unet": unet, **text_encoders}.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_kohya_lora(path, state, alpha, rank=unet.peft_config[ADAPTER].r, family=family)
    return path
