"""latentdiff: text-to-image latent diffusion (Stable Diffusion layout) — sampling, batch generation, fine-tuning.

    from latentdiff import load_pipeline
    pipe = load_pipeline()                      # the shipped default model; or a diffusers folder / SD .safetensors
    out = pipe("a red circle on a blue background", seed=42)
    out.images[0].save("circle.png")
"""
from .pipeline import GenerationOutput, LatentDiffusionPipeline, ModelError, load_pipeline
from .schedulers import SAMPLERS, ScheduleConfig, get_sampler

__all__ = ["GenerationOutput", "LatentDiffusionPipeline", "ModelError", "load_pipeline", "SAMPLERS", "ScheduleConfig", "get_sampler"]
__version__ = "0.1.0"
