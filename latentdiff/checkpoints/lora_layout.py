"""LoRA files in kohya's layout, the one A1111, ComfyUI and most shared LoRAs use (diffusers reads it too).

kohya's sd-scripts names a module by its diffusers path with dots as underscores, under `lora_unet_` or
`lora_te_` (the CLIP text model; SDXL: `lora_te1_` CLIP-L and `lora_te2_` bigG, networks/lora.py's
LORA_PREFIX_TEXT_ENCODER1/2); A/B are `lora_down`/`lora_up`, and each module stores its α as `.alpha`, so the
scale α/r travels with the file. ss_* metadata says what it is.
"""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from ..files import atomic_path

_PREFIXES = {"unet.": "lora_unet_", "text_encoder.": "lora_te_", "text_encoder_2.": "lora_te2_"}
_SDXL_PREFIXES = _PREFIXES | {"text_encoder.": "lora_te1_"}
BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}  # kohya's ss_base_model_version
_PARTS = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}


def to_kohya(state: dict[str, torch.Tensor], alpha: dict[str, float], family: str = "sd1") -> dict[str, torch.Tensor]:
    """diffusers/peft LoRA keys (`unet.<module>.lora_A.weight`, `text_encoder.<module>.lora_B.weight`, SDXL's
    `text_encoder_2.…`) → kohya's. `alpha` gives α per component ("unet", "text_encoder", "text_encoder_2")."""
    prefixes = _SDXL_PREFIXES if family == "sdxl" else _PREFIXES
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        part = next((p for p in _PARTS if key.endswith(p)), None)
        if prefix is None or part is None:
            raise ValueError(f"LoRA key {key!r} is not in the diffusers/peft layout (unet./text_encoder./text_encoder_2. "
                             "…lora_A/B).")
        module = key[len(prefix):-len(part)]
        if prefix != "unet." and not module.startswith("text_model."):
            module = "text_model." + module  # peft names CLIPTextModel's modules without its inner text_model
        name = prefixes[prefix] + module.replace(".", "_")
        out[name + _PARTS[part]] = tensor.contiguous()
        out[name + ".alpha"] = torch.tensor(float(alpha[prefix.rstrip(".")]), dtype=tensor.dtype)
    return out


def save_kohya_lora(path, state: dict[str, torch.Tensor], alpha: dict[str, float], *, rank: int,
                    family: str = "sd1") -> None:
    """Write `state` (diffusers/peft keys) as a kohya-layout safetensors file for a model of `family` ("sd1", "sd2",
    "sdxl"), atomically."""
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                "ss_network_alpha": f"{alpha.get('unet', rank):g}", "ss_base_model_version": BASE_MODEL_VERSIONS[family],
                "ss_training_comment": "trained with latentdiff"}
    with atomic_path(path, durable=True) as tmp:
        save_file(to_kohya(state, alpha, family), tmp, metadata=metadata)
