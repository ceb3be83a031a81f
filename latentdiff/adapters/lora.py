"""Loading LoRA adapters (Hu et al. 2021) into a model for inference, through diffusers' loaders and peft.

Reads the layout diffusers' `StableDiffusionPipeline.load_lora_weights` reads: latentdiff's own files
(peft `lora_A`/`lora_B` keys with the LoraConfig in the metadata) and the community layouts diffusers converts.
"""
from __future__ import annotations

from pathlib import Path


def load_lora(unet, text_encoder, path, scale: float = 1.0, adapter_name: str = "lora") -> None:
    """Load a LoRA file into the models, its output scaled by `scale`."""
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
