"""Exponential moving average of trained weights (Polyak averaging; what SD's released weights are)."""
from __future__ import annotations

import contextlib

import torch


class EMA:
    """θ_ema ← d·θ_ema + (1 − d)·θ with d = min(decay, (1 + n)/(10 + n)) so early steps are not frozen in.

    Its state_dict (decay, num_updates, the shadow tensors) goes into every checkpoint as ema.json +
    ema.safetensors (training/run.py save_checkpoint), never as a pickle.
    """

    def __init__(self, parameters, decay: float):
        self.parameters = list(parameters)
        self.decay = decay
        self.num_updates = 0
        self.shadow = [p.detach().clone().float() for p in self.parameters]

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for s, p in zip(self.shadow, self.parameters):
            s.lerp_(p.detach().to(s.device, s.dtype), 1 - d)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for s, p in zip(self.shadow, self.parameters):
            p.copy_(s)

    @contextlib.contextmanager
    def swapped(self):
        """Temporarily put the EMA weights into the model (for validation), restoring the trained ones after."""
        backup = [p.detach().clone() for p in self.parameters]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.parameters):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict(); ValueError when it does not fit these parameters (another model or config)."""
        decay, num_updates, shadow = state["decay"], state["num_updates"], state["shadow"]
        if not isinstance(decay, float) or not 0 <= decay < 1 or not isinstance(num_updates, int) or num_updates < 0:
            raise ValueError(f"EMA decay {decay!r} or update count {num_updates!r} is out of range")
        if not isinstance(shadow, list) or len(shadow) != len(self.parameters) or any(
                not isinstance(s, torch.Tensor) or s.shape != p.shape for s, p in zip(shadow, self.parameters)):
            raise ValueError("the EMA weights do not match the trained parameters (another model, LoRA rank or "
                             "--train-text-encoder setting?)")
        self.decay, self.num_updates = decay, num_updates
        self.shadow = [s.to(p.device, torch.float32) for s, p in zip(shadow, self.parameters)]
