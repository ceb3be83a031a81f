"""LoRA files in kohya's layout, the one A1111, ComfyUI and most shared LoRAs use (diffusers reads it too).

kohya's sd-scripts names a module by its diffusers path with dots as underscores, under `lora_unet_` or
`lora_te_` (the CLIP text model); A/B are `lora_down`/`lora_up`, and each module stores its α as `.alpha`, so the
scale α/r travels with the file. ss_* metadata says what it is.
"""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from ..files import atomic_path

_PREFIXES = {"unet.": "lora_unet_", "text_encoder.": "lora_te_"}
_PARTS = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}


def to_kohya(state: dict[str, torch.Tensor], alpha: dict[str, float]) -> dict[str, torch.Tensor]:
    """diffusers/peft LoRA keys (`unet.<module>.lora_A.weight`, `text_encoder.<module>.lora_B.weight`) → kohya's.
    `alpha` gives α per component ("unet", "text_encoder")."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
        part = next((p for p in _PARTS if key.endswith(p)), None)
        if prefix is None or part is None:
            raise ValueError(f"LoRA key {key!r} is not in the diffusers/peft layout (unet./text_encoder. …lora_A/B).")
        module = key[len(prefix):-len(part)]
        if prefix == "text_encoder." and not module.startswith("text_model."):
            module = "text_model." + module  # peft names CLIPTextModel's modules without its inner text_model
        name = _PREFIXES[prefix] + module.replace(".", "_")
        out[name + _PARTS[part]] = tensor.contiguous()
        out[name + ".alpha"] = torch.tensor(float(alpha[prefix.rstrip(".")]), dtype=tensor.dtype)
    return out


def save_kohya_lora(path, state: dict[str, torch.Tensor], alpha: dict[str, float], *, rank: int,
                    base_model: str = "sd_v1") -> None:
    """Write `state` (diffusers/peft keys) as a kohya-layout safetensors file, atomically."""
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                "ss_network_alpha": f"{alpha.get('unet', rank):g}", "ss_base_model_version": base_model,
                "ss_training_comment": "trained with latentdiff"}
    with atomic_path(path, durable=True) as tmp:
        save_file(to_kohya(state, alpha), tmp, metadata=metadata)
