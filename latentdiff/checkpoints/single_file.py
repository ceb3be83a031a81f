"""Stable Diffusion 1.x/2.x and SDXL single files (original CompVis/Stability/sgm layout) <-> diffusers/transformers models."""
from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path

import torch

from ..precision import component_dtypes
from ..schedulers.schedules import ScheduleConfig
from ..text import read_tokenizer
from .files import CheckpointError, read_metadata_config, read_state_dict, write_safetensors
from .keymaps import (CLIP_PREFIX, OPENCLIP_PREFIX, SDXL_CLIP_PREFIX, SDXL_OPENCLIP_PREFIX, UNET_PREFIX, KeyMap,
                      clip_keymap, openclip_keymap, unet_keymap, vae_keymap)
from .models import build_empty, cast, load_state, load_text_encoder_state, text_encoder_state

SHIPPED_CONFIGS = resources.files("latentdiff") / "configs"  # sd1/, sd2/, sdxl/: the published SD 1.5 / 2.1 / XL 1.0 configs
CONFIG_FILES = {
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}
# UNet config entries that tell SD 1.x/2.x apart from other architectures in the same layout
_ARCHITECTURE = (
    "in_channels", "block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
    "attention_head_dim", "cross_attention_dim", "use_linear_projection",
)


def _read_json(root, name: str) -> dict:
    return json.loads((root / CONFIG_FILES[name]).read_text())


def _components(layout: str) -> tuple[str, ...]:
    """The config files a layout has (SDXL: a second text encoder)."""
    return tuple(n for n in CONFIG_FILES if n != "text_encoder_2" or layout == "sdxl")


# What a file is when it is not an SD 1.x/2.x checkpoint: (a key prefix or part that only it has, what it is)
_OTHER_FILES = (
    ("conditioner.embedders.0.model.", "an SDXL refiner checkpoint: latentdiff runs SD 1.x/2.x and SDXL base models"),
    ("model.diffusion_model.joint_blocks.", "an SD3 checkpoint: latentdiff runs SD 1.x/2.x and SDXL"),
    ("double_blocks.", "a Flux checkpoint: latentdiff runs SD 1.x/2.x and SDXL"),
    ("lora_unet_", "a LoRA file: apply it to a model with --lora or load_lora()"),
    ("lora_te", "a LoRA file: apply it to a model with --lora or load_lora()"),  # lora_te_, SDXL: lora_te1_/lora_te2_
    (".lora_A.", "a LoRA file: apply it to a model with --lora or load_lora()"),
    ("emb_params", "a textual-inversion embedding: use it with --embedding or load_embedding()"),
    ("string_to_param", "a textual-inversion embedding: use it with --embedding or load_embedding()"),
)


def _what_else(state_dict) -> str | None:
    """One phrase naming a file that is not an SD 1.x/2.x or SDXL checkpoint, or None."""
    for part, what in _OTHER_FILES:
        if any(k.startswith(part) or (part.startswith(".") and part in k) or k.removeprefix("model.diffusion_model.")
               .startswith(part) for k in state_dict):
            return what
    if any(k.startswith(UNET_PREFIX) for k in state_dict):
        return None
    if any(k.startswith(("encoder.down.", "decoder.up.", "first_stage_model.")) for k in state_dict):
        return "a VAE-only file (no UNet): give it to a model's vae/ folder, not as --model"
    if any(k.startswith(("text_model.", "cond_stage_model.", "transformer.resblocks.")) for k in state_dict):
        return "a text-encoder-only file (no UNet), not a whole model"
    return None


def _detect_layout(path, state_dict) -> str:
    """"sd1" (OpenAI CLIP text encoder), "sd2" (OpenCLIP) or "sdxl" (sgm's two embedders), from the key names."""
    what = _what_else(state_dict)
    if what is not None:
        raise CheckpointError(f"{path} is {what}.")
    if not any(k.startswith(UNET_PREFIX) for k in state_dict):
        raise CheckpointError(
            f"{path} does not look like a Stable Diffusion 1.x/2.x/XL checkpoint (no model.diffusion_model.* keys)."
        )
    if any(k.startswith(SDXL_OPENCLIP_PREFIX) for k in state_dict):
        return "sdxl"
    if any(k.startswith("cond_stage_model.transformer.") for k in state_dict):
        return "sd1"
    if any(k.startswith(OPENCLIP_PREFIX) for k in state_dict):
        return "sd2"
    raise CheckpointError(
        f"{path} has no text encoder weights (expected cond_stage_model.transformer.* for SD 1.x, "
        "cond_stage_model.model.* for SD 2.x or conditioner.embedders.1.model.* for SDXL)."
    )


def _component_configs(path, layout: str, config_dir) -> dict[str, dict]:
    """From config_dir, else from our exporter's metadata, else the shipped configs of the layout.

    Only the scheduler config may be absent from the first two; the shipped one fills in.
    """
    names = _components(layout)
    if config_dir is not None:
        root = Path(config_dir)
        absent = [CONFIG_FILES[n] for n in names if n != "scheduler" and not (root / CONFIG_FILES[n]).is_file()]
        if absent:
            raise CheckpointError(f"{root} has no {', '.join(absent)} (expected a diffusers-format model folder).")
        configs = {n: _read_json(root, n) for n in names if (root / CONFIG_FILES[n]).is_file()}
    else:
        configs = read_metadata_config(path) or {}
    for name in names:
        if name not in configs:
            configs[name] = _read_json(SHIPPED_CONFIGS / layout, name)
    return configs


def _schedule(scheduler_config: dict, unet_config: dict, layout: str, prediction_type: str | None) -> ScheduleConfig:
    schedule = ScheduleConfig.from_diffusers(scheduler_config)
    if prediction_type is None and "prediction_type" not in scheduler_config:
        # SD 2.x 768-px models (latent size 96) predict v; the 512-px base models predict ε
        prediction_type = "v_prediction" if layout == "sd2" and unet_config.get("sample_size") == 96 else "epsilon"
    return dataclasses.replace(schedule, prediction_type=prediction_type) if prediction_type else schedule


def _unet_in_channels(state_dict, unet_config: dict) -> int:
    """The UNet's input channels from its first convolution's weight: 4 for SD, 9 for the inpainting layout
    (latents + mask + masked-image latents), whatever the config that came with the file says."""
    weight = state_dict.get(UNET_PREFIX + "input_blocks.0.0.weight")
    return int(weight.shape[1]) if weight is not None and weight.ndim == 4 else unet_config.get("in_channels", 4)


def _version(layout: str, unet_config: dict) -> str:
    """"sd1"/"sd2"/"sdxl", "sd1-inpainting"/"sd2-inpainting" (a 9-channel UNet), else "custom"."""
    shipped = _read_json(SHIPPED_CONFIGS / layout, "unet")
    if not all(unet_config.get(k) == shipped.get(k) for k in _ARCHITECTURE if k != "in_channels"):
        return "custom"
    channels = unet_config.get("in_channels")
    return layout if channels == shipped["in_channels"] else f"{layout}-inpainting" if channels == 9 else "custom"


def use_ema_weights(path, state_dict: dict) -> dict:
    """The UNet's EMA copy in place of its weights: LDM stores it as `model_ema.<key without the dots>` beside
    `model.diffusion_model.<key>`; CheckpointError if the file has none."""
    ema = {k: state_dict[e] for k in state_dict if k.startswith(UNET_PREFIX)
           and (e := "model_ema." + k[len("model."):].replace(".", "")) in state_dict}
    if not ema:
        raise CheckpointError(f"{path} has no EMA weights (model_ema.* keys) to use.")
    return {k: v for k, v in state_dict.items() if not k.startswith("model_ema.")} | ema


def load_single_file(path, *, config_dir=None, prediction_type: str | None = None, precision: str = "fp32", device="cpu",
                     ema: bool = False) -> dict:
    """UNet, VAE, text encoder(s), tokenizer(s) and schedule from one SD 1.x/2.x or SDXL .safetensors/.ckpt file.

    Returns {"unet", "vae", "text_encoder", "tokenizer", "schedule", "version"} (SDXL: + "text_encoder_2",
    "tokenizer_2"); version is "sd1"/"sd2"/"sdxl" when the UNet has the standard SD 1.x/2.x/XL architecture,
    "sd1-inpainting"/"sd2-inpainting" for its 9-channel inpainting variant (detected from the first convolution's
    weight), else "custom". Weights load in the dtypes latentdiff.precision's policy gives `precision` on `device`
    (default float32 throughout). `ema` loads the UNet's EMA weights that training checkpoints carry.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # 1. read the weights and tell SD 1.x, SD 2.x and SDXL apart by the text encoders' layout
    state_dict = read_state_dict(path)
    if ema:
        state_dict = use_ema_weights(path, state_dict)
    layout = _detect_layout(path, state_dict)
    configs = _component_configs(path, layout, config_dir)
    configs["unet"] = {**configs["unet"], "in_channels": _unet_in_channels(state_dict, configs["unet"])}
    dtypes = component_dtypes(precision, device, vae_force_upcast=configs["vae"].get("force_upcast", True))

    # 2. empty models from the configs
    unet = build_empty(lambda: UNet2DConditionModel.from_config(configs["unet"]))
    vae = build_empty(lambda: AutoencoderKL.from_config(configs["vae"]))
    text_config = CLIPTextConfig.from_dict(configs["text_encoder"])
    encoders = {"text_encoder": (build_empty(lambda: CLIPTextModel(text_config)), _text_keymap(layout, text_config))}
    if layout == "sdxl":
        config_2 = CLIPTextConfig.from_dict(configs["text_encoder_2"])
        encoders["text_encoder_2"] = (build_empty(lambda: CLIPTextModelWithProjection(config_2)), _bigg_keymap(config_2))

    # 3. original keys -> diffusers keys, loaded strictly into the empty models
    try:
        for model, keymap, dtype in ((unet, unet_keymap(unet.config), dtypes.unet), (vae, vae_keymap(vae.config), dtypes.vae)):
            load_state(model, cast(keymap.from_original(state_dict, model.state_dict()), dtype), keymap.name)
        for encoder, text_map in encoders.values():
            text_state = text_map.from_original(state_dict, text_encoder_state(encoder))
            load_text_encoder_state(encoder, cast(text_state, dtypes.text_encoder))
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None

    tokenizers = {t: read_tokenizer(config_dir, SHIPPED_CONFIGS / layout, name=t) for t in (name.replace("text_encoder", "tokenizer") for name in encoders)}
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        **{name: encoder.eval() for name, (encoder, _) in encoders.items()},
        **tokenizers,
        "schedule": _schedule(configs["scheduler"], configs["unet"], layout, prediction_type),
        "version": _version(layout, configs["unet"]),
    }


def _text_keymap(layout: str, config) -> KeyMap:
    """The (first) text encoder's key map: OpenAI CLIP for SD 1.x and SDXL, OpenCLIP ViT-H for SD 2.x."""
    if layout == "sd2":
        return openclip_keymap(config.num_hidden_layers)
    return clip_keymap(SDXL_CLIP_PREFIX if layout == "sdxl" else CLIP_PREFIX)


def _bigg_keymap(config) -> KeyMap:
    """SDXL's second text encoder: OpenCLIP ViT-bigG, every layer and the projection."""
    return openclip_keymap(config.num_hidden_layers, SDXL_OPENCLIP_PREFIX, projection=True)


def model_family(text_encoder, text_encoder_2=None) -> str:
    """"sdxl" (two text encoders), "sd2" (OpenCLIP ViT-H: gelu) or "sd1" (OpenAI CLIP: quick_gelu)."""
    return "sdxl" if text_encoder_2 is not None else "sd2" if text_encoder.config.hidden_act == "gelu" else "sd1"


def save_single_file(path, unet, vae, text_encoder, *, text_encoder_2=None, dtype: torch.dtype | None = None,
                     schedule: ScheduleConfig | None = None) -> None:
    """Write the models as one original-layout .safetensors, with their configs in the header.

    With `text_encoder_2` (SDXL), sgm's layout: the first encoder as `conditioner.embedders.0.transformer`, the second
    as OpenCLIP's `conditioner.embedders.1.model` (fused in_proj, transposed text_projection). Otherwise the text
    encoder is written in the SD 2.x OpenCLIP layout when it uses gelu (OpenCLIP ViT-H), else in the SD 1.x layout
    (OpenAI CLIP, quick_gelu). An SD 2.x encoder is written with the layers it has.
    """
    layout = model_family(text_encoder, text_encoder_2)
    state_dict = {
        **unet_keymap(unet.config).to_original(unet.state_dict()),
        **vae_keymap(vae.config).to_original(vae.state_dict()),
        **_text_keymap(layout, text_encoder.config).to_original(text_encoder_state(text_encoder)),
    }
    configs = {
        "unet": {k: v for k, v in unet.config.items() if not k.startswith("_")},
        "vae": {k: v for k, v in vae.config.items() if not k.startswith("_")},
        "text_encoder": text_encoder.config.to_dict(),
    }
    if text_encoder_2 is not None:
        state_dict |= _bigg_keymap(text_encoder_2.config).to_original(text_encoder_state(text_encoder_2))
        configs["text_encoder_2"] = text_encoder_2.config.to_dict()
    if schedule is not None:
        configs["scheduler"] = schedule.to_diffusers()
    write_safetensors(path, cast(state_dict, dtype), configs)
