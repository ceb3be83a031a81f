"""Exponential moving average of trained weights (Polyak averaging; what SD's released weights are)."""
from __future__ import annotations

import contextlib

import torch


class EMA:
    """θ_ema ← d·θ_ema + (1 − d)·θ with d = min(decay, (1 + n)/(10 + n)) so early steps are not frozen in.

    Registered with `accelerator.register_for_checkpointing`, so it saves and resumes with the run.
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
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.shadow = [s.to(p.device, torch.float32) for s, p in zip(state["shadow"], self.parameters)]
