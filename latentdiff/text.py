"""Prompt → token ids → text-encoder context (B, 77, D).

The CLIP tokenizer is built offline from the BPE merges that ship inside open_clip_torch,
in the same order OpenAI's CLIP (and so every SD tokenizer folder) numbers its vocabulary.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MAX_LENGTH = 77  # CLIP's context window: <start> + 75 tokens + <end>
_NUM_MERGES = 49152 - 256 - 2  # OpenAI CLIP keeps the first 48 894 merges → a 49 408-token vocabulary


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-unicode table (Radford et al. 2019), used by CLIP's BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bundled_bpe_path() -> Path:
    spec = importlib.util.find_spec("open_clip")  # locate the file without importing open_clip (slow)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip_torch is not installed; it provides the CLIP BPE vocabulary (pip install open_clip_torch)")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


@functools.lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.open(_bundled_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]  # line 0 is a version header
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, [tuple(m.split()) for m in merges]


def build_clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = MAX_LENGTH):
    """The standard CLIP tokenizer (SD 1.x pads with <|endoftext|>, SD 2.x with "!"), built with no download."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=model_max_length)


def read_tokenizer(*folders, name: str = "tokenizer"):
    """The first folder's `name`/ saved by transformers, or its `name`_config.json settings (pad token, window) on the
    bundled vocabulary; the standard CLIP tokenizer when no folder has either. None folders are skipped."""
    for folder in (Path(f) for f in folders if f is not None):
        if (folder / name).is_dir():
            from transformers import CLIPTokenizer

            return CLIPTokenizer.from_pretrained(os.fspath(folder / name))
        if (folder / f"{name}_config.json").is_file():
            return build_clip_tokenizer(**json.loads((folder / f"{name}_config.json").read_text()))
    return build_clip_tokenizer()


def tokenize(tokenizer, prompts: list[str]) -> torch.LongTensor:
    """Token ids (B, 77), padded to the window; words beyond it are dropped with a warning naming them."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    full = tokenizer(prompts, padding=False, truncation=False).input_ids
    for prompt, seq in zip(prompts, full):
        if len(seq) > tokenizer.model_max_length:
            _warn_dropped(tokenizer.model_max_length - 2, tokenizer.decode(seq[tokenizer.model_max_length - 1 : -1]))
    return ids


@functools.lru_cache(maxsize=4096)
def _warn_dropped(limit: int, dropped: str) -> None:
    """Once per long prompt (a training caption comes back every epoch)."""
    logger.warning("prompt is longer than %d tokens; these words were dropped: %r", limit, dropped)


def encode(text_encoder, input_ids: torch.LongTensor) -> torch.Tensor:
    """Context (B, 77, D): the encoder's last hidden state (SD 2.x folders already stop at the penultimate layer)."""
    return text_encoder(input_ids.to(text_encoder.device))[0]


# --- inference: A1111 prompt syntax, prompts of any length in 75-token chunks, clip skip ---------------------------

CHUNK = MAX_LENGTH - 2  # tokens of text per chunk, between <start> and <end>


def chunk_ids(tokenizer, prompt: str) -> tuple[torch.LongTensor, torch.Tensor]:
    """(ids, weights), each (k, 77): the prompt's tokens in k chunks of 75, each chunk <start> text <end> <pad>…,
    and each token's attention weight (1 for the special tokens). A plain prompt of at most 75 tokens is one chunk
    tokenized exactly as `tokenize` does; BREAK and a full chunk start the next one (A1111's rule, without its
    backtrack to the last comma)."""
    from .prompts import BREAK, is_plain, parse

    fragments = parse(prompt)
    if is_plain(fragments):
        text = "".join(t for t, _ in fragments)
        if len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids) <= CHUNK:
            return tokenize(tokenizer, [text]), torch.ones(1, MAX_LENGTH)
    chunks: list[list[tuple[int, float]]] = [[]]
    for text, weight in fragments:
        if text == BREAK and weight == -1:
            chunks.append([])
            continue
        for token in tokenizer(text, add_special_tokens=False, verbose=False).input_ids:
            if len(chunks[-1]) == CHUNK:
                chunks.append([])
            chunks[-1].append((token, weight))
    rows = [[(tokenizer.bos_token_id, 1.0), *chunk, (tokenizer.eos_token_id, 1.0)]
            + [(tokenizer.pad_token_id, 1.0)] * (CHUNK - len(chunk)) for chunk in chunks]
    return (torch.tensor([[t for t, _ in row] for row in rows]), torch.tensor([[w for _, w in row] for row in rows]))


def encode_hidden(text_encoder, input_ids: torch.LongTensor, clip_skip: int = 1) -> torch.Tensor:
    """(N, 77, D) context. clip_skip (A1111's numbering): 1 = the last layer; k = the k-th from the end, through
    the final layer norm (diffusers' `clip_skip = k − 1`)."""
    if clip_skip == 1:
        return encode(text_encoder, input_ids)
    layers = text_encoder.config.num_hidden_layers
    if not 1 <= clip_skip <= layers:
        raise ValueError(f"clip_skip must be between 1 and {layers} (this text encoder's layers), got {clip_skip}")
    hidden = text_encoder(input_ids.to(text_encoder.device), output_hidden_states=True).hidden_states[-clip_skip]
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)


def encode_prompts(tokenizer, text_encoder, prompts: list[str], clip_skip: int = 1) -> list[torch.Tensor]:
    """One context (77·k, D) per prompt, k its chunk count. All chunks go through the encoder as one batch.

    Weights as A1111 applies them: each token's embedding × its weight, then the whole prompt rescaled to its
    original mean. (A1111 takes that mean over the whole batch; here over the prompt alone, so an image never
    depends on its batch mates.)
    """
    chunked = [chunk_ids(tokenizer, p) for p in prompts]
    hidden = encode_hidden(text_encoder, torch.cat([ids for ids, _ in chunked]), clip_skip)  # (Σk, 77, D)
    return _weighted(hidden, chunked)


def encode_sdxl(text_encoder, input_ids: torch.LongTensor, clip_skip: int = 1):
    """SDXL's use of one of its two encoders on token ids: (context (N, 77, D), pooled (N, P) or None).

    The context is the hidden state `clip_skip` layers before the last one (1: the penultimate), without the final
    layer norm (sgm's layer="penultimate"; diffusers' clip_skip = k − 1 reads hidden_states[−(k + 1)]). `pooled` is a
    CLIPTextModelWithProjection's projected output (ViT-bigG's `text_embeds`); None for an encoder without one.
    """
    layers = text_encoder.config.num_hidden_layers
    if not 1 <= clip_skip < layers:
        raise ValueError(f"clip_skip must be between 1 and {layers - 1} for SDXL (its text encoder has {layers} "
                         f"layers), got {clip_skip}")
    out = text_encoder(input_ids.to(text_encoder.device), output_hidden_states=True)
    return out.hidden_states[-(clip_skip + 1)], getattr(out, "text_embeds", None)


def encode_prompts_sdxl(tokenizer, text_encoder, prompts: list[str], clip_skip: int = 1):
    """`encode_sdxl` of prompts: (contexts (77·k, D) per prompt, weighted as in `encode_prompts`; pooled (n, P) of
    each prompt's first chunk (as A1111 takes it), or None)."""
    chunked = [chunk_ids(tokenizer, p) for p in prompts]
    hidden, pooled = encode_sdxl(text_encoder, torch.cat([ids for ids, _ in chunked]), clip_skip)
    if pooled is not None:
        first = torch.tensor([0, *[len(ids) for ids, _ in chunked[:-1]]]).cumsum(0)  # each prompt's first chunk
        pooled = pooled[first.to(pooled.device)]
    return _weighted(hidden, chunked), pooled


def _weighted(hidden: torch.Tensor, chunked) -> list[torch.Tensor]:
    """(Σk, 77, D) hidden states → one (77·k, D) context per prompt, its tokens' weights applied as A1111 does."""
    contexts = list(hidden.split([len(ids) for ids, _ in chunked]))
    for i, (_, weights) in enumerate(chunked):
        if not torch.all(weights == 1):
            z = contexts[i]
            w = weights.to(z.device, z.dtype).unsqueeze(-1)  # (k, 77, 1)
            weighted = z * w
            weighted_f = weighted.float()
            mean, new_mean = z.float().mean(), weighted_f.mean()
            # A context of mean ~0 (a final LayerNorm without bias, as freshly initialised) has no mean to restore:
            # its ratio is rounding noise over rounding noise, up to 0/0. Decided on the device: no sync.
            has_mean = new_mean.abs() > 1e-4 * weighted_f.abs().mean()
            contexts[i] = weighted * torch.where(has_mean, mean / new_mean, 1.0).to(z.dtype)
    return [c.flatten(0, 1) for c in contexts]  # (77·k, D)
