"""Prompt → token ids → text-encoder context (B, 77, D).

The CLIP tokenizer is built offline from the BPE merges that ship inside open_clip_torch,
in the same order OpenAI's CLIP (and so every SD tokenizer folder) numbers its vocabulary.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
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
