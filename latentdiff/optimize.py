"""Inference speed levers: each one measured side by side in benchmarks/bench_inference.py, kept only where it pays.

Kept by default: channels_last (UNet and VAE), a lean scaled-dot-product attention processor, and sliced + tiled
VAE decoding above 1024 px (memory, not speed). bf16 weights on native-bf16 CPUs come from `precision.resolve_dtype`.
Opt-in: `torch.compile` of the UNet (`compile=True`; its cold compile costs more than a few images save).
Left out on CPU: fused QKV projections (7.0 → 6.9 s per image in issue 5's measurement, within noise here, and they
would hide LoRA layers loaded later); precomputed timestep embeddings (a sinusoid and two small linears on a (1, 320)
vector per step, nothing next to a UNet call); thread settings (torch already runs one thread per physical core).
CUDA: the same levers apply (channels_last suits tensor cores; fp16 comes from `precision`), unmeasured here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def optimize_for_inference(pipe, *, compile: bool = False):
    """Apply the default levers to a loaded pipeline in place; returns it."""
    use_channels_last(pipe.unet, pipe.vae)
    use_lean_attention(pipe.unet)
    enable_tiled_decode(pipe.vae)
    if compile:
        compile_unet(pipe.unet)
    return pipe


def use_channels_last(*models: torch.nn.Module) -> None:
    """NHWC convolutions: oneDNN's fast bf16 path on CPU (and tensor-core friendly on CUDA)."""
    for model in models:
        model.to(memory_format=torch.channels_last)


class LeanAttnProcessor:
    """SDPA for plain (cross-)attention blocks, without the generic processor's reshapes, casts and `/ 1.0` rescale."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self._general = AttnProcessor2_0()  # masks: rare at inference, left to diffusers

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attention_mask is not None:
            return self._general(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states  # (B, N, C) / (B, 77, D)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        q, k, v = (x.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for x in (q, k, v))  # (B, heads, N, d)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (B, N, C)
        return attn.to_out[0](out)  # to_out[1] is dropout: identity in eval


def _is_plain(attn) -> bool:
    """q/k/v linears → SDPA → out linear and nothing else: every attention block of an SD UNet."""
    return (attn.group_norm is None and attn.spatial_norm is None and attn.norm_cross is None
            and getattr(attn, "norm_q", None) is None and getattr(attn, "add_k_proj", None) is None
            and not attn.residual_connection and attn.rescale_output_factor == 1.0
            and not getattr(attn, "fused_projections", False))


def use_lean_attention(model: torch.nn.Module) -> int:
    """Install `LeanAttnProcessor` on every attention block it covers exactly; returns how many."""
    from diffusers.models.attention_processor import Attention

    blocks = [m for m in model.modules() if isinstance(m, Attention) and _is_plain(m)]
    for attn in blocks:
        attn.set_processor(LeanAttnProcessor())
    return len(blocks)


def enable_tiled_decode(vae) -> None:
    """Decode one image at a time, and images larger than a tile in overlapping, linearly blended tiles (diffusers').

    A whole 1024² bf16 decode adds only ~1.4 GB (measured), so tiles start above 1024 px there (no seams at all
    up to 1024²); float32 activations are twice the size, so tiles start above 512 px.
    """
    tile = 1024 if vae.dtype.itemsize <= 2 else 512
    vae.enable_slicing()
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // 2 ** (len(vae.config.block_out_channels) - 1)


def compile_unet(unet: torch.nn.Module) -> None:
    """`torch.compile` the UNet in place; the first call at each new shape pays the compile time."""
    unet.compile()
