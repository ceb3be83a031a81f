"""Weights added on top of a model at inference: LoRA adapters (training writes them, see training/lora.py) and
textual-inversion embeddings."""

from .embeddings import EMBEDDING_SUFFIXES, Embeddings, embedding_files, read_embedding
from .lora import LORA_SUFFIXES, Loras, adapter_name, find_lora, lora_hash, lora_tags

__all__ = ["EMBEDDING_SUFFIXES", "Embeddings", "embedding_files", "read_embedding", "LORA_SUFFIXES", "Loras", "adapter_name", "find_lora", "lora_hash", "lora_tags"]
