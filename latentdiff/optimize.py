"""Inference speed levers: each one measured in benchmarks/ (bench_levers.py lever by lever, bench_inference.py
against diffusers), kept only where it pays.

Kept by default, one CFG UNet step of SD 1.5 in bf16 on 2 CPU cores at 256² / 512² (results/levers.md; runs vary
by about 10 %): diffusers' bf16 0.90 / 4.23 s; + channels_last (UNet and VAE) 0.86 / 3.95; + a lean
scaled-dot-product attention processor 0.91 / 3.94; + prepacked oneDNN weights 0.66 / 3.67. bf16 weights on
native-bf16 CPUs come from `precision.resolve_dtype`. Sliced + tiled VAE decoding above 1024 px keeps 1024² under
8 GB (memory, not speed).
Opt-in: `torch.compile` of the UNet (`compile=True`). On this CPU it does not pay: with inductor's freezing a step
takes 0.83 / 4.00 s after a 85–94 s cold compile; it is there for CUDA, where it usually does (unmeasured here).
Left out, measured no gain here: fused QKV projections (they would also hide LoRA layers loaded later), GEGLU fused
into oneDNN post-ops, math attention, padded head dims, malloc and denormal settings; precomputed timestep
embeddings (a sinusoid and two small linears per step) and thread settings (torch already runs one per core).
Where a 512² step goes: attention 49 %, convolution 28 %, linear 16 %. Convs and linears run at 720–920 GFLOP/s
(oneDNN's bf16 peak here); attention is PyTorch's CPU flash kernel, the one diffusers calls too, at ~145 GFLOP/s
for 4096 tokens × 40-wide heads: the rest of the gap to diffusers at 512² is there.
CUDA (`_optimize_cuda`, from the H100 profile in shared/GPU.md; not measured by this project yet): NCHW, SDPA
attention, the UNet call replayed from CUDA graphs; fp16 UNet and text encoder and, where the VAE is fp16-safe, an
fp16 VAE come from `precision.component_dtypes`; prepacking is CPU only.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def optimize_for_inference(pipe, *, compile: bool = False):
    """Apply the default levers of the pipeline's device to it in place; returns it."""
    if pipe.device.type == "cuda":
        return _optimize_cuda(pipe, compile)
    use_channels_last(pipe.unet, pipe.vae)
    use_lean_attention(pipe.unet)
    if compile:
        compile_unet(pipe.unet)  # inductor's freezing packs the UNet's weights itself
        use_prepacked_weights(pipe.vae)
    else:
        use_prepacked_weights(pipe.unet, pipe.vae)
    enable_tiled_decode(pipe.vae)
    return pipe


def _optimize_cuda(pipe, compile: bool):
    """NCHW (channels_last adds ~155 layout copies per SD UNet call around GroupNorm on CUDA: 25.7 → 39.0 ms),
    SDPA attention, and the UNet call replayed from a CUDA graph (10–12 ms of kernels that took 26–44 ms of
    launches: 2.4× on an H100, shared/GPU.md). compile=True: torch.compile's "reduce-overhead" mode, the fastest
    measured there (6.6 ms per call after a 76 s compile), which brings its own CUDA graphs."""
    use_lean_attention(pipe.unet)
    enable_tiled_decode(pipe.vae)
    if compile:
        pipe.unet.compile(mode="reduce-overhead")
    else:
        pipe.denoiser = CUDAGraphUNet(pipe.unet)
    return pipe


class CUDAGraphUNet:
    """The UNet call captured once per (batch, height, width, dtype, timestep dtype, context length) into a CUDA graph
    and replayed (float timesteps, as Euler's Karras schedule feeds them, must not land in an int64 buffer).

    Static input buffers receive each call's x_t, t and Condition (context; SDXL's text_embeds and time_ids too); the
    output buffer is overwritten by the next replay (the loop consumes it first). Weights changed in place are seen by the replay; a change of layers (LoRA loaded,
    merged, unmerged, its scale changed) is detected from the LoRA layers' state and the graphs are captured again.
    If capture fails, the call runs eagerly, with one warning.
    """

    def __init__(self, unet, warmup: int = 2):
        self.unet, self.warmup = unet, warmup
        self._graphs: dict = {}
        self._lora_layers = None
        self._token = None
        self._failed = False

    def reset(self) -> None:
        """Forget every graph and the list of LoRA layers (call after adding or removing layers)."""
        self._graphs.clear()
        self._lora_layers = None

    def _lora_token(self):
        """What a graph bakes in beyond the weights' memory: each adapter layer merged or not, its active adapters and
        scales. The layers are listed once (a walk of the UNet); their state is read on every call (cheap)."""
        if self._lora_layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._lora_layers = [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]
        return tuple((m.merged, tuple(m.active_adapters), tuple(sorted(getattr(m, "scaling", {}).items())))
                     for m in self._lora_layers)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, condition) -> torch.Tensor:
        if self._failed or torch.is_grad_enabled():
            return self.unet(x, t, **condition.unet_kwargs(), return_dict=False)[0]
        token = self._lora_token()
        if token != self._token:
            self._graphs.clear()
            self._token = token
        key = (tuple(x.shape), x.dtype, tuple(t.shape), t.dtype, *((tuple(c.shape), c.dtype) for c in condition.tensors()))
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(x, t, condition)
            except Exception as e:  # noqa: BLE001 — any capture failure: eager is always correct
                logger.warning("CUDA graph capture of the UNet failed (%s); running it eagerly", e)
                self._failed = True
                return self.unet(x, t, **condition.unet_kwargs(), return_dict=False)[0]
        graph, static_x, static_t, static_condition, out = self._graphs[key]
        for static, value in ((static_x, x), (static_t, t), *zip(static_condition.tensors(), condition.tensors())):
            static.copy_(value)
        graph.replay()
        return out

    def _capture(self, x, t, condition):
        static_x, static_t, static_condition = x.clone(), t.clone(), condition.map(torch.clone)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs requires
            for _ in range(self.warmup):
                self.unet(static_x, static_t, **static_condition.unet_kwargs(), return_dict=False)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.unet(static_x, static_t, **static_condition.unet_kwargs(), return_dict=False)[0]
        return graph, static_x, static_t, static_condition, out


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
        if q.device.type == "cpu":  # the CPU flash kernel runs faster on dense heads: 0.36 → 0.31 s at 4096 tokens
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (B, N, C)
        return attn.to_out[0](out)  # to_out[1] is dropout: identity in eval


class _Prepacked:
    """Mixin for nn.Conv2d / nn.Linear: hand oneDNN its weight already reordered into its blocked layout.

    A plain CPU conv/linear call reorders the weight on every call: 1.5–2.5 ms for a 1280×1280×3×3 bf16 weight,
    about a third of an SD UNet step at 256² (benchmarks/README.md). The reordered copy depends on the input
    shape, so it is made on the first call at each shape and kept until the shape or the weight changes.
    Inference only: with autograd on, or off the CPU, the plain forward runs. Costs one extra copy of the weights.
    """

    _packed = None  # (key, sample of the weight, reordered weight)

    def forward(self, x):
        w = self.weight
        if x.device.type != "cpu" or x.dtype != w.dtype or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)):
            return super().forward(x)
        # A weight change shows in `_version` (load_state_dict, no_grad in-place ops) or, where that is blind
        # (`w.data += delta` as peft's LoRA merge does it; inference tensors have none), in a sample of its values
        # (2 µs a layer, 0.5 ms an SD UNet step).
        key = (tuple(x.shape), w.data_ptr(), None if w.is_inference() else w._version)
        sample = w.detach().as_strided((min(64, w.numel()),), (max(1, w.numel() // 64),))  # spread over the storage
        if self._packed is None or self._packed[0] != key or not torch.equal(self._packed[1], sample):
            self._packed = (key, sample.clone(), self._pack(x))
        return self._run(x, self._packed[2])

    def __getstate__(self):  # deepcopy/pickle: the opaque oneDNN tensor has no storage to copy; it is rebuilt on use
        return {**super().__getstate__(), "_packed": None}


class PrepackedConv2d(_Prepacked, nn.Conv2d):
    def _args(self):
        return list(self.padding), list(self.stride), list(self.dilation), self.groups

    def _pack(self, x):
        return torch.ops.mkldnn._reorder_convolution_weight(self.weight, *self._args(), list(x.shape))

    def _run(self, x, weight):
        if self.weight.is_contiguous(memory_format=torch.channels_last):  # as F.conv2d does; the op keeps x's layout
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, *self._args(), "none", [], "")


class PrepackedLinear(_Prepacked, nn.Linear):
    def _pack(self, x):
        return torch.ops.mkldnn._reorder_linear_weight(self.weight, x.shape[:-1].numel())

    def _run(self, x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")


def use_prepacked_weights(*models: torch.nn.Module) -> int:
    """Turn every plain nn.Conv2d/nn.Linear of CPU models with a oneDNN-native dtype into its prepacked twin.

    The class swap keeps parameters, state_dict keys and `isinstance` (peft's LoRA wraps them as usual); returns
    how many layers were swapped. The packed copies double those weights' memory, so nothing is swapped (one
    warning) when they would take more than half the memory available: SDXL's UNet in float32 is 10 GB.
    """
    if not torch.backends.mkldnn.is_available():
        return 0
    dtypes = {torch.float32} | ({torch.bfloat16} if torch.ops.mkldnn._is_mkldnn_bf16_supported() else set())
    twins = {nn.Conv2d: PrepackedConv2d, nn.Linear: PrepackedLinear}
    layers = [m for model in models for m in model.modules()
              if type(m) in twins and m.weight.device.type == "cpu" and m.weight.dtype in dtypes
              # padding the oneDNN op cannot express
              and not (type(m) is nn.Conv2d and (m.padding_mode != "zeros" or isinstance(m.padding, str)))]
    need, available = sum(m.weight.nbytes for m in layers), available_memory()
    if available is not None and need > available // 2:
        logger.warning("weights not prepacked for oneDNN: the packed copy (%.1f GB) would take more than half of the "
                       "%.1f GB of memory available; generation runs, a little slower", need / 2**30, available / 2**30)
        return 0
    for m in layers:
        m.__class__ = twins[type(m)]
    return len(layers)


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux's MemAvailable); None where /proc/meminfo has none."""
    try:
        with open("/proc/meminfo") as f:
            line = next((line for line in f if line.startswith("MemAvailable:")), None)
    except OSError:
        return None
    return None if line is None else int(line.split()[1]) * 1024  # kB


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
    """`torch.compile` the UNet in place; the first call at each new shape pays the compile time.

    On the CPU with inductor's freezing: weights become constants that it prepacks for oneDNN itself (the eager
    prepacked layers would break its graph); weights changed after the first call (a LoRA loaded later) are not seen.
    """
    unet.compile(options={"freezing": True} if unet.device.type == "cpu" else None)
