"""Weights added on top of a model at inference: LoRA adapters (training writes them, see training/lora.py)."""

from .lora import load_lora

__all__ = ["load_lora"]
