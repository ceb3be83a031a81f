"""Training LoRA adapters (Hu et al. 2021) through peft: W x + (α/r)·B A x on the attention projections.

Files are written in the layout diffusers' `StableDiffusionPipeline.load_lora_weights` reads:
`unet.<module>.lora_A.weight` / `lora_B.weight` (+ `text_encoder.…`), with the peft LoraConfig
(rank, alpha, targets) in the safetensors metadata so α ≠ r survives the round trip; latentdiff.adapters
loads them for inference. `save_kohya` writes the same adapters in the layout A1111 and ComfyUI read.
"""
from __future__ import annotations

from pathlib import Path

from latentdiff.files import atomic_path

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
    with atomic_path(path, durable=True) as tmp:  # diffusers writes into a folder under a name of our choosing
        StableDiffusionPipeline.save_lora_weights(tmp.parent, weight_name=tmp.name, safe_serialization=True, **kwargs)
    return path


def save_kohya(path, unet, text_encoder=None) -> Path:
    """The same adapters in kohya's layout (checkpoints/lora_layout.py), the file A1111 and ComfyUI load."""
    from peft.utils import get_peft_model_state_dict

    from latentdiff.checkpoints.lora_layout import save_kohya_lora

    models = {"unet": unet, **({"text_encoder": text_encoder} if text_encoder is not None else {})}
    state = {f"{name}.{k}": v for name, model in models.items()
             for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER).items()}
    alpha = {name: model.peft_config[ADAPTER].lora_alpha for name, model in models.items()}
    wide = text_encoder is not None and text_encoder.config.hidden_size == 1024  # OpenCLIP ViT-H: SD 2.x
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_kohya_lora(path, state, alpha, rank=unet.peft_config[ADAPTER].r, base_model="sd_v2" if wide else "sd_v1")
    return path
