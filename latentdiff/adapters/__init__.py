"""Weights added on top of a model at inference: LoRA adapters (training writes them, see training/lora.py)."""

from .lora import LORA_SUFFIXES, Loras, adapter_name, find_lora, lora_hash, lora_tags

__all__ = ["LORA_SUFFIXES", "Loras", "adapter_name", "find_lora", "lora_hash", "lora_tags"]
