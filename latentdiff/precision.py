"""Precision names (`fp32`, `bf16`, `fp16`, `auto`) → torch dtypes for a device."""
from __future__ import annotations

import functools

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision_name(dtype: torch.dtype) -> str:
    return next(name for name, d in _DTYPES.items() if d == dtype)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """`auto` is fp16 on CUDA/MPS, bf16 on CPUs with native bf16, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return _DTYPES[precision]
    if device.type in ("cuda", "mps"):
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def process_state():
    """accelerate's view of this process (rank, world size, device: one GPU per process under `accelerate launch`).

    With no GPU, `accelerate launch --multi_gpu --num_processes N` starts N CPU processes; accelerate joins them
    with gloo only when told the run is on the CPU, hence `cpu=`.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def default_device() -> torch.device:
    return process_state().device
