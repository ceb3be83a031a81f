"""Key maps between the original CompVis/Stability single-file layout and the diffusers/transformers layout.

A `KeyMap` is written once, from the diffusers side: each diffusers module path names the original
module path that holds the same weights. The same table converts in both directions (`to_original`
for export, `from_original` for loading), so the two can never drift apart. The UNet and VAE tables
are derived from the diffusers config, so any number of blocks / layers per block works.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .files import mismatch_error

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."  # SD 1.x: OpenAI CLIP ViT-L/14, HF layout
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H/14
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."  # SDXL (sgm): OpenAI CLIP ViT-L/14, HF layout
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL: OpenCLIP ViT-bigG/14


@dataclass(frozen=True)
class KeyMap:
    name: str  # component, for messages
    prefix: str  # where the component lives in a single file
    modules: dict[str, str]  # diffusers module (or parameter) path -> original path; unlisted paths are equal
    conv1x1: frozenset[str] = frozenset()  # diffusers Linear layers stored as 1x1 Conv2d in the original
    fused_qkv: dict[str, str] = field(default_factory=dict)  # diffusers attention -> original with in_proj_{weight,bias}
    transposed: frozenset[str] = frozenset()  # diffusers Linear weights stored as the (in, out) matrix x @ W of the original
    ignore: str | None = None  # regex for original keys (after the prefix) that are dropped on load

    def original_key(self, key: str) -> str:
        """The original key (without prefix) of one diffusers key: the longest listed module path wins."""
        parts = key.split(".")
        for i in range(len(parts), 0, -1):
            module = ".".join(parts[:i])
            if module in self.modules:
                return ".".join([self.modules[module], *parts[i:]])
        return key

    def _fused(self, key: str) -> tuple[str, int] | None:
        """For q/k/v projections of a fused attention: (original in_proj key, chunk index 0/1/2)."""
        m = re.fullmatch(r"(.*)\.([qkv])_proj\.(weight|bias)", key)
        if m and m[1] in self.fused_qkv:
            return f"{self.fused_qkv[m[1]]}.in_proj_{m[3]}", "qkv".index(m[2])
        return None

    def to_original(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Diffusers state dict -> original keys, with this map's prefix."""
        out, qkv = {}, {}
        for key, tensor in state_dict.items():
            if fused := self._fused(key):
                qkv.setdefault(fused[0], [None] * 3)[fused[1]] = tensor
                continue
            if key.rsplit(".", 1)[0] in self.conv1x1 and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
            elif key in self.transposed:
                tensor = tensor.T
            out[self.prefix + self.original_key(key)] = tensor
        for key, chunks in qkv.items():
            out[self.prefix + key] = torch.cat(chunks)
        return out

    def from_original(self, state_dict: dict[str, torch.Tensor], diffusers_keys) -> dict[str, torch.Tensor]:
        """Original state dict (full keys, other components allowed) -> the listed diffusers keys.

        Strict within this component: a missing weight, or one under the prefix that the map does not
        use and `ignore` does not cover, raises CheckpointError.
        """
        out, used, missing = {}, set(), []
        for key in diffusers_keys:
            if fused := self._fused(key):
                source, chunk = fused
            else:
                source, chunk = self.original_key(key), None
            tensor = state_dict.get(self.prefix + source)
            if tensor is None:
                missing.append(self.prefix + source)
                continue
            used.add(self.prefix + source)
            if chunk is not None:
                tensor = tensor.chunk(3)[chunk].clone()  # own storage, so the model saves with safetensors
            elif key.rsplit(".", 1)[0] in self.conv1x1 and tensor.ndim == 4:
                tensor = tensor[:, :, 0, 0]
            elif key in self.transposed:
                tensor = tensor.T.contiguous()
            out[key] = tensor
        unexpected = [
            k for k in state_dict
            if k.startswith(self.prefix) and k not in used
            and not (self.ignore and re.match(self.ignore, k[len(self.prefix):]))
        ]
        if missing or unexpected:
            raise mismatch_error(self.name, missing, unexpected)
        return out


# ldm ResBlock (UNet) layer names; diffusers ResnetBlock2D names on the left.
_UNET_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}


def _resnet(modules: dict, diffusers: str, original: str) -> None:
    modules.update({f"{diffusers}.{d}": f"{original}.{o}" for d, o in _UNET_RESNET.items()})


def unet_keymap(config) -> KeyMap:
    """UNet2DConditionModel <-> ldm openaimodel.UNetModel.

    ldm numbers its blocks flat: input_blocks[0] is conv_in, then per down block `layers_per_block`
    (resnet, attention?) pairs and a downsampler (except the last); output_blocks holds
    `layers_per_block + 1` (resnet, attention?, upsampler?) triples per up block.
    """
    n, per = len(config["block_out_channels"]), config["layers_per_block"]
    m = {
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
        "mid_block.attentions.0": "middle_block.1",
    }
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text + size/crop embedding (sgm's label_emb)
        m |= {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    _resnet(m, "mid_block.resnets.0", "middle_block.0")
    _resnet(m, "mid_block.resnets.1", "middle_block.2")
    for i, kind in enumerate(config["down_block_types"]):
        for j in range(per):
            idx = 1 + i * (per + 1) + j
            _resnet(m, f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0")
            if kind.startswith("CrossAttn"):
                m[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{idx}.1"
        if i < n - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{1 + i * (per + 1) + per}.0.op"
    for i, kind in enumerate(config["up_block_types"]):
        attention = kind.startswith("CrossAttn")
        for j in range(per + 1):
            idx = i * (per + 1) + j
            _resnet(m, f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0")
            if attention:
                m[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{idx}.1"
        if i < n - 1:
            last = i * (per + 1) + per
            m[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{last}.{2 if attention else 1}.conv"
    return KeyMap("UNet", UNET_PREFIX, m)


def _vae_resnet(modules: dict, diffusers: str, original: str) -> None:
    # ResnetBlock2D matches ldm's VAE ResnetBlock except for the name of the 1x1 shortcut
    modules[diffusers] = original
    modules[f"{diffusers}.conv_shortcut"] = f"{original}.nin_shortcut"


def vae_keymap(config) -> KeyMap:
    """AutoencoderKL <-> ldm autoencoder Encoder/Decoder (whose up blocks count from the bottom)."""
    n = len(config["block_out_channels"])
    m = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    conv1x1 = set()
    for part in ("encoder", "decoder"):
        _vae_resnet(m, f"{part}.mid_block.resnets.0", f"{part}.mid.block_1")
        _vae_resnet(m, f"{part}.mid_block.resnets.1", f"{part}.mid.block_2")
        attn = f"{part}.mid_block.attentions.0"
        # ldm's AttnBlock uses 1x1 convs where diffusers' Attention uses Linear layers
        for d, o in {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}.items():
            m[f"{attn}.{d}"] = f"{part}.mid.attn_1.{o}"
        conv1x1 |= {f"{attn}.{d}" for d in ("to_q", "to_k", "to_v", "to_out.0")}
    per = config["layers_per_block"]
    for i in range(n):
        for j in range(per):
            _vae_resnet(m, f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        for j in range(per + 1):  # the decoder has one resnet more per block
            _vae_resnet(m, f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{n - 1 - i}.block.{j}")
        m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{n - 1 - i}.upsample.conv"
    return KeyMap("VAE", VAE_PREFIX, m, frozenset(conv1x1))


def clip_keymap(prefix: str = CLIP_PREFIX) -> KeyMap:
    """CLIPTextModel <-> SD 1.x `cond_stage_model.transformer` (SDXL: `conditioner.embedders.0.transformer`): already
    the transformers layout.

    Diffusers keys are written without `text_model.` (the transformers 5 spelling).
    """
    return KeyMap("text encoder", prefix, {}, ignore=r"embeddings\.position_ids$")


def openclip_keymap(num_layers: int, prefix: str = OPENCLIP_PREFIX, projection: bool = False) -> KeyMap:
    """CLIPTextModel <-> SD 2.x OpenCLIP text tower; with `projection`, CLIPTextModelWithProjection <-> SDXL's ViT-bigG.

    SD 2.x conditions on the penultimate layer, so the diffusers model has one layer fewer than the
    checkpoint: the extra resblocks, `text_projection` and `logit_scale` are dropped on load. SDXL keeps every layer
    (it reads the penultimate hidden state itself) and the projection, which OpenCLIP applies as x @ P: P = W^T.
    """
    m = {
        "embeddings.token_embedding": "token_embedding",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm": "ln_final",
    }
    fused = {}
    for i in range(num_layers):
        d, o = f"encoder.layers.{i}", f"transformer.resblocks.{i}"
        m.update({
            f"{d}.layer_norm1": f"{o}.ln_1", f"{d}.self_attn.out_proj": f"{o}.attn.out_proj",
            f"{d}.layer_norm2": f"{o}.ln_2", f"{d}.mlp.fc1": f"{o}.mlp.c_fc", f"{d}.mlp.fc2": f"{o}.mlp.c_proj",
        })
        fused[f"{d}.self_attn"] = f"{o}.attn"
    resblock = rf"transformer\.resblocks\.(?!({'|'.join(map(str, range(num_layers)))})\.)\d+\."
    if projection:
        m["text_projection.weight"] = "text_projection"
    return KeyMap("text encoder 2" if projection else "text encoder", prefix, m, fused_qkv=fused,
                  transposed=frozenset({"text_projection.weight"} if projection else ()),
                  ignore=rf"({'' if projection else 'text_projection|'}logit_scale|attn_mask)$|{resblock}")
