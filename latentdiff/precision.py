"""One precision policy: the dtype of each component (UNet, text encoder, VAE) for a device and a precision name.

Every loader asks `component_dtypes`; nothing else decides a model's dtype.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

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


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of: {', '.join(PRECISIONS)}")


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """`auto` is fp16 on CUDA/MPS, bf16 on CPUs with native bf16, else fp32."""
    check_precision(precision)
    if precision != "auto":
        return _DTYPES[precision]
    if device.type in ("cuda", "mps"):
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


@dataclass(frozen=True)
class ComponentDtypes:
    unet: torch.dtype
    text_encoder: torch.dtype
    vae: torch.dtype


def component_dtypes(precision: str, device, *, vae_force_upcast: bool = True) -> ComponentDtypes:
    """The UNet and text encoder run in the resolved dtype; the VAE too, except that fp16 overflows in most SD VAE
    decoders: with fp16 the VAE stays in float32 unless its config says it is fp16-safe (`force_upcast: false`,
    diffusers' convention; its decode is then retried in float32 if the output is not finite)."""
    dtype = resolve_dtype(precision, torch.device(device))
    upcast = dtype == torch.float16 and vae_force_upcast
    return ComponentDtypes(unet=dtype, text_encoder=dtype, vae=torch.float32 if upcast else dtype)
