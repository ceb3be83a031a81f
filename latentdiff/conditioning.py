"""Prompts → what the UNet takes besides (x_t, t): one `Conditioner` per model family, one `Condition` to carry it.

SD 1.x/2.x: one CLIP text encoder, the cross-attention context (77·k, D). SDXL (Podell et al. 2023, sec. 2.1–2.2):
two encoders, OpenAI CLIP ViT-L and OpenCLIP ViT-bigG, whose penultimate hidden states are joined to one
768 + 1280 = 2048-wide context; bigG's pooled projection (`text_embeds`) and the size/crop micro-conditioning
(`time_ids` = original_size + crops_coords_top_left + target_size) enter through the UNet's added embedding
(diffusers' addition_embed_type "text_time").
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import text


@dataclass(frozen=True)
class Condition:
    """The UNet's inputs besides (x_t, t), rows first: context (…, L, D); SDXL's text_embeds (…, P) and time_ids (…, 6)."""

    context: torch.Tensor
    text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def map(self, fn) -> "Condition":
        """fn applied to every tensor it holds (zeroed, cloned…)."""
        return Condition(*(None if x is None else fn(x) for x in self.fields()))

    def fields(self) -> tuple:
        """Every field in order, None included."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def tensors(self) -> tuple:
        """The tensors it holds, in field order."""
        return tuple(x for x in self.fields() if x is not None)

    def unet_kwargs(self) -> dict:
        """Keyword arguments of UNet2DConditionModel.forward."""
        added = None if self.text_embeds is None else {"text_embeds": self.text_embeds, "time_ids": self.time_ids}
        return {"encoder_hidden_states": self.context, "added_cond_kwargs": added}


def stack(conditions: list[Condition]) -> Condition:
    """Per-image conditions → one batch (rows in list order)."""
    return _join(torch.stack, conditions)


def cat(conditions: list[Condition]) -> Condition:
    """Batches → one batch ([uncond; cond] for classifier-free guidance)."""
    return _join(torch.cat, conditions)


def _join(fn, conditions: list[Condition]) -> Condition:
    return Condition(*(None if xs[0] is None else fn(xs) for xs in zip(*(c.fields() for c in conditions))))


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2) as (height, width) and (top, left) in pixels.

    None is diffusers' default: original and target size = the generated size, crop (0, 0). Each negative_* defaults
    to its positive (diffusers uses the negatives only when both negative sizes are given)."""

    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None

    def time_ids(self, height: int, width: int) -> tuple[list[int], list[int]]:
        """(positive, negative) time ids: original_size + crops_coords_top_left + target_size, 6 numbers each."""
        original = self.original_size or (height, width)
        target = self.target_size or (height, width)
        positive = [*original, *self.crops_coords_top_left, *target]
        negative = [*(self.negative_original_size or original),
                    *(self.negative_crops_coords_top_left or self.crops_coords_top_left),
                    *(self.negative_target_size or target)]
        for value in (positive, negative):
            if len(value) != 6 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError("original_size, crops_coords_top_left and target_size (and their negative_*) must be "
                                 f"pairs of integers, got {value}")
        return positive, negative


class CLIPConditioner:
    """SD 1.x/2.x: one tokenizer and CLIP text encoder → the context."""

    zero_empty_negative = False

    def __init__(self, tokenizer, text_encoder):
        self.tokenizers, self.text_encoders = (tokenizer,), (text_encoder,)
        self.max_clip_skip = text_encoder.config.num_hidden_layers  # k = 1 … the first layer (text.encode_hidden)

    def encode(self, prompts: list[str], clip_skip: int = 1) -> list[Condition]:
        """One Condition (context (77·k, D)) per prompt."""
        return [Condition(c) for c in text.encode_prompts(self.tokenizers[0], self.text_encoders[0], prompts, clip_skip)]

    def with_time_ids(self, condition: Condition, time_ids: list[int]) -> Condition:
        """SD 1.x/2.x UNets take no time ids."""
        return condition


class SDXLConditioner:
    """SDXL: two tokenizers and encoders (ViT-L, ViT-bigG with projection) → context, text_embeds; time_ids added.

    `zero_empty_negative`: an empty negative prompt is all zeros, context and text_embeds (SDXL base's
    force_zeros_for_empty_prompt; diffusers applies it when negative_prompt is None)."""

    def __init__(self, tokenizers, text_encoders, *, zero_empty_negative: bool = True):
        self.tokenizers, self.text_encoders = tuple(tokenizers), tuple(text_encoders)
        self.zero_empty_negative = zero_empty_negative
        # k reads hidden_states[−(k + 1)] of each encoder (text.encode_prompts_sdxl)
        self.max_clip_skip = min(e.config.num_hidden_layers for e in text_encoders) - 1

    def encode(self, prompts: list[str], clip_skip: int = 1) -> list[Condition]:
        """One Condition (context (77·k, 2048), text_embeds (P,)) per prompt; time ids come with `with_time_ids`."""
        outputs = [text.encode_prompts_sdxl(tokenizer, encoder, prompts, clip_skip)
                   for tokenizer, encoder in zip(self.tokenizers, self.text_encoders)]
        return [Condition(*join_encoders([(contexts[i], None if pooled is None else pooled[i])
                                          for contexts, pooled in outputs])) for i in range(len(prompts))]

    def with_time_ids(self, condition: Condition, time_ids: list[int]) -> Condition:
        """The condition with its (6,) time ids, in the context's dtype (as diffusers' _get_add_time_ids)."""
        ids = torch.tensor(time_ids, dtype=condition.context.dtype, device=condition.context.device)
        return dataclasses.replace(condition, time_ids=ids)


def join_encoders(outputs) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's [(context (…, D_i), pooled or None) per encoder] → (the contexts side by side (…, ΣD_i): 768 + 1280 =
    2048 wide, the pooled output of the last encoder with a projection: bigG's `text_embeds`). Inference and training
    (the trainer's Denoiser, on `text.encode_sdxl` of each encoder) join them here."""
    contexts, pooled = zip(*outputs)
    return torch.cat(contexts, dim=-1), [p for p in pooled if p is not None][-1]
