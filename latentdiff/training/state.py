"""Trainer state on disk as safetensors + JSON only: loading a checkpoint can never run code.

A pickle (what `torch.save` and accelerate's `save_state` write for optimisers, RNG states and registered
objects) can carry a `__reduce__` that runs when it is loaded. latentdiff therefore writes no pickles: a state
object (a nest of dicts, lists, tuples, numbers, strings and tensors, such as an optimiser's `state_dict()`) is
split into NAME.safetensors (the tensors) and NAME.json (everything else, with each tensor replaced by a
reference), and joined back the same way. Neither format can describe anything but data.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class StateError(ValueError):
    """A state file that is missing, unreadable or not what latentdiff writes; the message names the file."""


_TENSOR, _DICT, _TUPLE, _LIST = "__tensor__", "__dict__", "__tuple__", "__list__"


def _split(obj, tensors: dict[str, torch.Tensor], storages: set[int]):
    """`obj` as JSON-able data, its tensors moved into `tensors` (keyed by their order) and referenced by key."""
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        elif t.untyped_storage().data_ptr() in storages or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)  # safetensors refuses shared or strided storage
        storages.add(t.untyped_storage().data_ptr())
        tensors[key] = t
        return {_TENSOR: key}
    if isinstance(obj, dict):  # keys may be ints (an optimiser's state is keyed by parameter index)
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in obj):
            raise TypeError(f"state dict keys must be str or int, got {[type(k).__name__ for k in obj]}")
        return {_DICT: [[k, _split(v, tensors, storages)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {_TUPLE if isinstance(obj, tuple) else _LIST: [_split(v, tensors, storages) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}  # strict JSON has no nan/inf
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint; only tensors, numbers, strings and containers")


def _join(data, tensors: dict[str, torch.Tensor], used: set[str]):
    if isinstance(data, (bool, int, float, str)) or data is None:
        return data
    if isinstance(data, dict) and len(data) == 1:
        (kind, value), = data.items()
        if kind == _TENSOR and isinstance(value, str) and value in tensors:
            used.add(value)
            return tensors[value]
        if kind == _DICT and isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value):
            return {_key(k): _join(v, tensors, used) for k, v in value}
        if kind in (_TUPLE, _LIST) and isinstance(value, list):
            items = [_join(v, tensors, used) for v in value]
            return tuple(items) if kind == _TUPLE else items
        if kind == "__float__" and value in ("nan", "inf", "-inf"):
            return float(value)
    raise ValueError(f"unexpected entry {str(data)[:80]!r}")


def _key(k):
    if isinstance(k, bool) or not isinstance(k, (str, int)):
        raise ValueError(f"unexpected key {k!r}")
    return k


def save_state(folder, name: str, state) -> list[Path]:
    """Write `state` as folder/NAME.json (+ folder/NAME.safetensors when it holds tensors); returns the files.

    The caller makes the folder's appearance atomic (checkpoints are written into a staging folder).
    """
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    data = {"format": "latentdiff-state-1", "state": _split(state, tensors, set())}
    written = []
    if tensors:
        save_file(tensors, folder / f"{name}.safetensors")
        written.append(folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps(data, allow_nan=False))
    written.append(folder / f"{name}.json")
    return written


def load_state(folder, name: str, device: torch.device | str = "cpu"):
    """What save_state(folder, NAME, …) stored, tensors on `device`; StateError if the files are missing or damaged."""
    folder = Path(folder)
    meta, weights = folder / f"{name}.json", folder / f"{name}.safetensors"
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StateError(f"{meta} is missing") from None
    except OSError as e:
        raise StateError(f"cannot read {meta} ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:
        raise StateError(f"{meta} is not valid JSON ({str(e)[:80]})") from None
    if not isinstance(data, dict) or data.get("format") != "latentdiff-state-1" or "state" not in data:
        raise StateError(f"{meta} is not a latentdiff state file")
    try:
        tensors = load_file(weights, device=str(device)) if weights.exists() else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise StateError(f"{weights} is not a readable safetensors file ({str(e)[:120]})") from None
    used: set[str] = set()
    try:
        state = _join(data["state"], tensors, used)
    except (ValueError, RecursionError) as e:
        raise StateError(f"{meta} is damaged or does not match {weights.name} ({str(e)[:120]})") from None
    if used != set(tensors):
        raise StateError(f"{weights} holds tensors that {meta.name} does not mention")
    return state


def save_module(module: torch.nn.Module, path) -> None:
    """A module's state dict (parameters and buffers) as one safetensors file, tied tensors stored once."""
    from safetensors.torch import save_model

    save_model(module, str(path))


def load_module(module: torch.nn.Module, path) -> None:
    """Load save_module's file into `module` (every key must match); StateError on a damaged or foreign file."""
    from safetensors.torch import load_model

    path = Path(path)
    if not path.is_file():
        raise StateError(f"{path} is missing")
    try:
        missing, unexpected = load_model(module, str(path), strict=False)
    except (SafetensorError, OSError, ValueError) as e:
        raise StateError(f"{path} is not a readable safetensors file ({str(e)[:120]})") from None
    except RuntimeError as e:  # shapes of another model
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise StateError(f"{path} does not match the model being trained ({lines[min(1, len(lines) - 1)][:160]})") from None
    if missing or unexpected:
        example = sorted(missing or unexpected)[0]
        raise StateError(f"{path} does not match the model being trained ({len(missing)} of the model's tensors are not in it, "
                         f"{len(unexpected)} of its tensors are unknown, e.g. {example})")
