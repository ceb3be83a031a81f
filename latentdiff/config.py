"""Generation defaults, held once: the API, the batch script, the PNG metadata and the evaluator read them here."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenerateConfig:
    """How an image is made, beyond its prompt and the model. Width and height default to the model's native size."""

    negative_prompt: str = ""
    steps: int = 20
    # ≤ 1 skips the unconditional pass. 5: diffusers' SDXL default, in A1111's usual 5-7; the shipped model draws
    # clean shapes at 4-6 and over-saturates from ~7 (README, "The shipped default model")
    guidance_scale: float = 5.0
    sampler: str = "dpmpp_2m"  # a name of latentdiff.schedulers.SAMPLERS
    eta: float = 0.0  # DDIM's noise scale (0 = deterministic)
    scheduler: str | None = None  # the noise schedule (latentdiff.schedulers.SCHEDULERS); None: the model's default
    clip_skip: int = 1  # A1111's numbering: 1 = the text encoder's last layer, 2 = the one before
    guidance_rescale: float = 0.0  # Lin et al. 2023's φ (0 = off)
    # A1111's NGMS (guidance.unconditional_skips): the σ below which the unconditional pass is skipped, and whether on
    # every such step or every other one; None: the model's own (model_defaults.py; off for a model that names none)
    guidance_min_sigma: float | None = None
    guidance_min_sigma_all_steps: bool | None = None
    width: int | None = None
    height: int | None = None
    precision: str = "auto"  # latentdiff.precision.PRECISIONS
    strength: float = 0.75  # image-to-image: the share of the schedule run from the noised init image (A1111's default)
    inpaint_strength: float = 1.0  # inpainting: the masked region starts from pure noise (diffusers' default)
    mask_blur: float = 4.0  # inpainting: the mask's feather, a Gaussian σ in pixels (A1111's "Mask blur" default)


DEFAULTS = GenerateConfig()
