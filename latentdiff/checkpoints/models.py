"""Filling models with weights: built empty on the meta device, then given the loaded tensors.

Building on meta and loading with `assign=True` means each weight is allocated once (by the file
reader), never a second time for random initialisation.
"""
from __future__ import annotations

import torch
from accelerate import init_empty_weights

from .files import mismatch_error

TEXT_MODEL_PREFIX = "text_model."  # transformers < 5 and every SD folder/file spell CLIP keys with it


def build_empty(factory):
    """`factory()` with parameters on the meta device; buffers (e.g. CLIP's position_ids) stay real."""
    with init_empty_weights(include_buffers=False):
        return factory()


def cast(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating-point tensors in `dtype` (integer tensors untouched); None keeps them as stored."""
    if dtype is None:
        return state_dict
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def load_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Strict load; a meta model takes the tensors themselves, a real one copies them in."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise mismatch_error(what, missing, unexpected)
    meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(state_dict, strict=True, assign=meta)


def text_encoder_state(model) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's (or CLIPTextModelWithProjection's) weights keyed without `text_model.`, whatever the
    transformers version; the projection stays `text_projection.weight`."""
    return {k.removeprefix(TEXT_MODEL_PREFIX): v for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def folder_text_encoder_state(model) -> dict[str, torch.Tensor]:
    """The keys of a diffusers folder's text_encoder(_2)/model.safetensors: `text_model.…`, and `text_projection.weight`
    beside it (the layout real SD/SDXL folders and transformers 4 use)."""
    return {(k if k.startswith("text_projection.") else TEXT_MODEL_PREFIX + k): v for k, v in text_encoder_state(model).items()}


def load_text_encoder_state(model, state_dict: dict[str, torch.Tensor]) -> None:
    """Load CLIPTextModel(WithProjection) weights strictly, with or without the `text_model.` key prefix.

    transformers 5 names the keys `embeddings.…`, older versions and SD files `text_model.embeddings.…`;
    both load into either. Only `position_ids` buffers are ignored.
    """
    expected = model.state_dict()
    bare = {k.removeprefix(TEXT_MODEL_PREFIX): v for k, v in state_dict.items() if not k.endswith("position_ids")}
    state_dict = {(k if k in expected else TEXT_MODEL_PREFIX + k): v for k, v in bare.items()}
    load_state(model, state_dict, "text encoder")
