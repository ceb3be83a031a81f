"""Reading and writing weight files: safetensors, or weights-only pickles (.ckpt/.pt/.bin)."""
from __future__ import annotations

import json
import os
import pickle

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..files import atomic_path

METADATA_KEY = "latentdiff_config"  # safetensors header entry: JSON of the component configs


class CheckpointError(ValueError):
    """A weight file that cannot be read or does not hold what was expected."""


def mismatch_error(what: str, missing: list[str], unexpected: list[str]) -> CheckpointError:
    parts = [f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []
    parts += [f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else []
    return CheckpointError(f"the {what} weights do not match the model config: {'; '.join(parts)}.")


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors or weights-only .ckpt/.pt/.bin file, on the CPU."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is not a file (expected a .safetensors or .ckpt checkpoint).")
    if path.endswith(".safetensors"):
        try:
            return load_file(path)  # memory-mapped; tensors are read once
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names the refused import ("GLOBAL module.name"); other unpickling failures mean damaged bytes
        if "GLOBAL" in str(e):
            raise CheckpointError(
                f"{path} is not a plain tensor checkpoint (it contains code); only weights-only .ckpt files are loaded."
            ) from None
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {e}") from None
    except Exception as e:  # torch reports damaged archives as RuntimeError, EOFError, KeyError, ...
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {e}") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]  # PyTorch Lightning / CompVis training checkpoints
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(data).__name__}).")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def read_metadata_config(path) -> dict | None:
    """The component configs our exporter stored in a safetensors header, or None."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        return None
    try:
        with safe_open(path, "pt") as f:
            text = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    return json.loads(text) if text else None


def write_safetensors(path, state_dict: dict[str, torch.Tensor], config: dict | None = None) -> None:
    """Write atomically: a killed job leaves the old file or the new one, never half of one."""
    path = os.fspath(path)
    metadata = {"format": "pt"}
    if config is not None:
        metadata[METADATA_KEY] = json.dumps(config)
    with atomic_path(path, durable=True) as tmp:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp, metadata=metadata)
