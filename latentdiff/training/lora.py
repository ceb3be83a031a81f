"""LoRA (Hu et al. 2021) through peft: W x + (α/r)·B A x on the attention projections.

Files are written in the layout diffusers' `StableDiffusionPipeline.load_lora_weights` reads:
`unet.<module>.lora_A.weight` / `lora_B.weight` (+ `text_encoder.…`), with the peft LoraConfig
(rank, alpha, targets) in the safetensors metadata so α ≠ r survives the round trip.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers Attention projections
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP attention
ADAPTER = "default"


def _lora_config(rank: int, alpha: float | None, targets: list[str]):
    from peft import LoraConfig

    # gaussian A, zero B: training starts from exactly the base model
    return LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets)


def add_lora(unet, text_encoder, rank: int, alpha: float | None = None) -> None:
    """Attach trainable adapters (the only parameters left with requires_grad); text_encoder None = UNet only."""
    unet.add_adapter(_lora_config(rank, alpha, UNET_TARGETS), adapter_name=ADAPTER)
    if text_encoder is not None:
        text_encoder.add_adapter(_lora_config(rank, alpha, TEXT_ENCODER_TARGETS), adapter_name=ADAPTER)


def save_lora(path, unet, text_encoder=None) -> Path:
    """One safetensors file, written to a temporary folder then renamed into place."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    path = Path(path)
    # peft's own key names (lora_A / lora_B): the layout diffusers' loaders read natively
    kwargs = {"unet_lora_layers": get_peft_model_state_dict(unet, adapter_name=ADAPTER),
              "unet_lora_adapter_metadata": unet.peft_config[ADAPTER].to_dict()}
    if text_encoder is not None:
        kwargs["text_encoder_lora_layers"] = get_peft_model_state_dict(text_encoder, adapter_name=ADAPTER)
        kwargs["text_encoder_lora_adapter_metadata"] = text_encoder.peft_config[ADAPTER].to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".lora-") as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, weight_name=path.name, safe_serialization=True, **kwargs)
        os.replace(Path(tmp) / path.name, path)
    return path


def load_lora(unet, text_encoder, path, scale: float = 1.0, adapter_name: str = "lora") -> None:
    """Load a LoRA file (ours or any diffusers-layout SD LoRA) into the models, output scaled by `scale`."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(path.parent), weight_name=path.name,
                                                                       return_lora_metadata=True)
    # as StableDiffusionPipeline.load_lora_weights does it; metadata keys carry the unet./text_encoder. prefixes
    if any(k.startswith("unet.") for k in state):
        StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, adapter_name=adapter_name, metadata=metadata)
        unet.set_adapters([adapter_name], weights=[scale])
    if text_encoder is not None and any(k.startswith("text_encoder.") for k in state):
        StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, text_encoder, lora_scale=scale,
                                                            adapter_name=adapter_name, metadata=metadata)
