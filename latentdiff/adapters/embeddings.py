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


def read_embedding(path) -> tuple[str, dict[str, torch.Tensor]]:
    """(the file's own token name, {encoder: vectors (n, width)}) of an A1111 or diffusers embedding file. The
    encoder keys are diffusers' component names: "text_encoder" for SD 1.x/2.x files; for SDXL files also
    "text_encoder_2", whose vectors the file calls clip_g (clip_l's go to "text_encoder")."""
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
    if "clip_l" in data and "clip_g" in data:  # SDXL
        name, vectors = path.stem, {"text_encoder": data["clip_l"], "text_encoder_2": data["clip_g"]}
    elif "string_to_param" in data:  # A1111 .pt
        name, vectors = path.stem, {"text_encoder": next(iter(data["string_to_param"].values()))}
    elif "emb_params" in data:  # A1111 .safetensors
        name, vectors = path.stem, {"text_encoder": data["emb_params"]}
    elif len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):  # diffusers: {token: vector}
        name, vector = next(iter(data.items()))
        vectors = {"text_encoder": vector}
    else:
        raise ValueError(f"{path} is not an embedding: expected string_to_param, emb_params, clip_l and clip_g, or "
                         f"one token's vector, found {', '.join(list(data)[:4])}.")
    vectors = {k: v.detach().float().reshape(-1, v.shape[-1]) for k, v in vectors.items()}
    if len({len(v) for v in vectors.values()}) > 1:
        raise ValueError(f"{path} holds {' and '.join(str(len(v)) for v in vectors.values())} vectors for its two "
                         "encoders; expected the same number.")
    return name, vectors


class Embeddings:
    """The embeddings loaded into a model's tokenizers and text encoders: word → its tokens.

    `encoders` maps diffusers' component name to (tokenizer, text encoder): "text_encoder" for SD 1.x/2.x, plus
    "text_encoder_2" for SDXL. A word gets the same tokens in every tokenizer, each encoder its own vectors."""

    def __init__(self, encoders: dict):
        self.encoders = {k: pair for k, pair in encoders.items() if pair[1] is not None}
        self.tokens: dict[str, list[str]] = {}
        self.files: dict[str, Path] = {}

    def load(self, path, token: str | None = None) -> str:
        """Add the file's vectors as the word `token` (default: A1111's file name, or the token a diffusers file
        stores); returns the word."""
        name, vectors = read_embedding(path)
        word = token or name
        if set(vectors) != set(self.encoders):
            theirs, ours = ("SDXL (clip_l/clip_g)" if len(d) == 2 else "SD 1.x/2.x" for d in (vectors, self.encoders))
            raise ValueError(f"{path} is an {theirs} embedding; this model takes {ours} ones.")
        tokens = [word] + [f"{word}_{i}" for i in range(1, len(vectors["text_encoder"]))]
        for key, (tokenizer, encoder) in self.encoders.items():
            width = encoder.get_input_embeddings().weight.shape[1]
            if vectors[key].shape[1] != width:
                raise ValueError(f"embedding {path} has vectors of width {vectors[key].shape[1]}; this text encoder "
                                 f"takes {width} (an embedding for another model family).")
            if any(t in tokenizer.get_vocab() for t in tokens):
                raise ValueError(f"the word {word!r} is already a token of this tokenizer; load the embedding with "
                                 "another token name.")
        for key, (tokenizer, encoder) in self.encoders.items():
            tokenizer.add_tokens(tokens)
            ids = tokenizer.convert_tokens_to_ids(tokens)
            encoder.resize_token_embeddings(len(tokenizer))
            with torch.no_grad():
                table = encoder.get_input_embeddings().weight
                table[ids] = vectors[key].to(table.device, table.dtype)
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
