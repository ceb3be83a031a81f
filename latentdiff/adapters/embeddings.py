"""Textual-inversion embeddings (Gal et al. 2022): learned token vectors that a prompt names by a word.

Reads A1111's files (`.pt` with `string_to_param`, `.safetensors` with `emb_params`) and diffusers'
(`learned_embeds.safetensors`/`.bin`: {token: vector}), single- or multi-vector. A word of n vectors becomes n new
tokens `name name_1 … name_{n-1}` (diffusers' `load_textual_inversion` layout, so both give the same context); the
prompt's word is expanded to them before tokenizing.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")


def embedding_files(folder) -> list[Path]:
    """Every embedding file of a folder, in name order (its own files, not its subfolders', as A1111 loads them)."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in EMBEDDING_SUFFIXES and p.is_file())


def read_embedding(path) -> tuple[str, torch.Tensor]:
    """(the file's own token name, vectors (n, width)) of an A1111 or diffusers embedding file."""
    path = Path(path)
    if path.suffix.lower() not in EMBEDDING_SUFFIXES:
        raise ValueError(f"{path} is not an embedding file; expected .safetensors, .pt or .bin.")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(path)
        else:  # weights only: a pickle from the internet runs no code
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — any unreadable file is one sentence
        raise ValueError(f"cannot read embedding {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds no embedding (expected a dict of tensors).")
    if "clip_l" in data or "clip_g" in data:
        raise ValueError(f"{path} is an SDXL embedding (clip_l/clip_g vectors); this model takes SD 1.x/2.x ones.")
    if "string_to_param" in data:  # A1111 .pt
        vectors, name = next(iter(data["string_to_param"].values())), path.stem
    elif "emb_params" in data:  # A1111 .safetensors
        vectors, name = data["emb_params"], path.stem
    elif len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):  # diffusers: {token: vector}
        name, vectors = next(iter(data.items()))
    else:
        raise ValueError(f"{path} is not an embedding: expected string_to_param, emb_params or one token's vector, "
                         f"found {', '.join(list(data)[:4])}.")
    vectors = vectors.detach().float()
    return name, vectors.reshape(-1, vectors.shape[-1])


class Embeddings:
    """The embeddings loaded into one tokenizer and text encoder: word → its tokens."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.tokens: dict[str, list[str]] = {}
        self.files: dict[str, Path] = {}

    def load(self, path, token: str | None = None) -> str:
        """Add the file's vectors as the word `token` (default: A1111's file name, or the token a diffusers file
        stores); returns the word."""
        name, vectors = read_embedding(path)
        word = token or name
        width = self.text_encoder.get_input_embeddings().weight.shape[1]
        if vectors.shape[1] != width:
            raise ValueError(f"embedding {path} has vectors of width {vectors.shape[1]}; this text encoder takes "
                             f"{width} (an embedding for another model family).")
        tokens = [word] + [f"{word}_{i}" for i in range(1, len(vectors))]
        taken = [t for t in tokens if t in self.tokenizer.get_vocab()]
        if taken:
            raise ValueError(f"the word {word!r} is already a token of this tokenizer; load the embedding with another "
                             "token name.")
        self.tokenizer.add_tokens(tokens)
        ids = self.tokenizer.convert_tokens_to_ids(tokens)
        self.text_encoder.resize_token_embeddings(len(self.tokenizer))
        with torch.no_grad():
            table = self.text_encoder.get_input_embeddings().weight
            table[ids] = vectors.to(table.device, table.dtype)
        self.tokens[word], self.files[word] = tokens, Path(path)
        return word

    def expand(self, prompt: str) -> str:
        """The prompt with each loaded word replaced by its tokens (as diffusers' maybe_convert_prompt)."""
        for word, tokens in self.tokens.items():
            if len(tokens) > 1:
                prompt = re.sub(rf"(?<![\w-]){re.escape(word)}(?![\w-])", " ".join(tokens), prompt)
        return prompt

    def used(self, prompt: str) -> list[str]:
        """The loaded words a prompt names."""
        return [w for w in self.tokens if re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", prompt)]
