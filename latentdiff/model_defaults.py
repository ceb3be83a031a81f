"""Sampling settings a model folder recommends for itself, used where a call leaves them unset.

They live in the folder's `latentdiff.json` (diffusers ignores the file), as a diffusers scheduler config's
use_karras_sigmas makes Karras the model's default schedule. Today one setting: A1111's "Negative Guidance minimum
sigma" (NGMS, latentdiff.guidance.unconditional_skips), which the shipped model is measured best with; a model without
the file gets A1111's default, off.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ModelError

FILE = "latentdiff.json"


@dataclass(frozen=True)
class ModelDefaults:
    guidance_min_sigma: float = 0.0  # NGMS: below this σ the unconditional pass is skipped (0 = never)
    guidance_min_sigma_all_steps: bool = False  # skip it on every such step (A1111: every other one)

    def __post_init__(self):
        check_min_sigma(self.guidance_min_sigma, self.guidance_min_sigma_all_steps)

    def resolve(self, min_sigma: float | None, all_steps: bool | None) -> tuple[float, bool]:
        """The NGMS a call runs with: what it gives, else this model's."""
        min_sigma = self.guidance_min_sigma if min_sigma is None else min_sigma
        all_steps = self.guidance_min_sigma_all_steps if all_steps is None else all_steps
        check_min_sigma(min_sigma, all_steps)
        return float(min_sigma), bool(all_steps)

    @classmethod
    def read(cls, folder: Path) -> "ModelDefaults":
        file = Path(folder) / FILE
        if not file.is_file():
            return cls()
        try:
            return cls(**json.loads(file.read_text()))
        except (ValueError, TypeError) as e:  # bad JSON, an unknown key, or a value of the wrong kind
            raise ModelError(f"{file} is not a latentdiff model-defaults file ({e}); expected a JSON object with "
                             f"guidance_min_sigma (a number ≥ 0) and guidance_min_sigma_all_steps (true/false)") from None

    def write(self, folder: Path) -> None:
        """Into a folder being built (save_pretrained); nothing when every setting is the default."""
        if self != ModelDefaults():
            (Path(folder) / FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")


def check_min_sigma(min_sigma, all_steps) -> None:
    if isinstance(min_sigma, bool) or not isinstance(min_sigma, (int, float)) or not (math.isfinite(min_sigma)
                                                                                      and min_sigma >= 0):
        raise ValueError(f"guidance_min_sigma must be a number ≥ 0 (a noise level σ; 0 = off), got {min_sigma!r}")
    if not isinstance(all_steps, bool):
        raise ValueError(f"guidance_min_sigma_all_steps must be true or false, got {all_steps!r}")
