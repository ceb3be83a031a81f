"""One pipeline call from a job's settings, and the PNG `parameters` of each image it makes.

The batch script (commands/generate.py) and the server (server/) both go through here, so a setting reaches the
pipeline the same way and an image's file says the same whichever of them made it.
"""
from __future__ import annotations

from pathlib import Path

from .adapters import adapter_name, lora_hash, lora_tags
from .config import GenerateConfig
from .errors import ModelError, first_line
from .files import file_sha256
from .pipeline import load_pipeline
from .pngmeta import GenerationParams
from .precision import precision_name
from .schedulers import SCHEDULE_A1111, check_scheduler, get_sampler

STRENGTH, MASK_BLUR = "Denoising strength", "Mask blur"  # A1111's names in the PNG parameters
NGMS, NGMS_ALL = "NGMS", "NGMS all steps"


def load_model(model=None, **options):
    """`load_pipeline`, with any failure (a corrupt or foreign file) as one ModelError sentence naming the model."""
    try:
        return load_pipeline(model, **options)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"cannot load model {model or 'default'}: {first_line(e)}") from e


def generate(pipe, cfg: GenerateConfig, prompts: list[str], seeds: list[int], *, images=None, masks=None,
             lora_dir=None, callback=None):
    """One batch: prompt k with seed k (and init image / mask k for image-to-image and inpainting)."""
    init = {} if images is None else {"image": images, "strength": cfg.strength}
    if masks is not None:
        init |= {"mask_image": masks, "mask_blur": cfg.mask_blur}
    return pipe(prompts, cfg.negative_prompt, height=cfg.height, width=cfg.width, num_inference_steps=cfg.steps,
                guidance_scale=cfg.guidance_scale, seed=seeds, sampler=cfg.sampler, scheduler=cfg.scheduler,
                eta=cfg.eta, clip_skip=cfg.clip_skip, guidance_rescale=cfg.guidance_rescale,
                guidance_min_sigma=cfg.guidance_min_sigma, guidance_min_sigma_all_steps=cfg.guidance_min_sigma_all_steps,
                progress=False, lora_dir=lora_dir, callback=callback, **init)


def png_params(pipe, cfg: GenerateConfig, prompt: str, seed: int, *, init: bool, mask: bool,
               loras: dict[str, Path]) -> GenerationParams:
    """The `parameters` of one image; `loras`: every LoRA file applied to it, by adapter name."""
    extra = {"Precision": precision_name(pipe.dtype), **({"Eta": f"{cfg.eta:g}"} if cfg.eta else {}),
             **prompt_params(cfg, pipe), **({STRENGTH: f"{cfg.strength:g}"} if init else {}),
             **({MASK_BLUR: f"{cfg.mask_blur:g}"} if mask else {})}
    if loras:
        extra["Lora hashes"] = ", ".join(f"{n}: {lora_hash(f)}" for n, f in loras.items())
    return GenerationParams(prompt, cfg.negative_prompt, cfg.steps, cfg.sampler, cfg.guidance_scale, seed, cfg.width,
                            cfg.height, pipe.name, pipe.model_hash,
                            extra | embedding_params(pipe, prompt, cfg.negative_prompt))


def applied_loras(prompt: str, given: dict[str, Path], tag_files: dict[str, Path]) -> dict[str, Path]:
    """The LoRA files one prompt's image gets: those given for every image, then its own `<lora:…>` tags'."""
    return given | {adapter_name(n): tag_files[n] for n in lora_tags(prompt)[1] if n in tag_files}


def embedding_params(pipe, prompt: str, negative: str) -> dict[str, str]:
    """A1111's `TI hashes` field: the embeddings this image's prompts use, by word, with the file's short sha256."""
    used = dict.fromkeys(pipe.embeddings.used(prompt) + pipe.embeddings.used(negative))
    return {"TI hashes": ", ".join(f"{w}: {file_sha256(pipe.embeddings.files[w])[:12]}" for w in used)} if used else {}


def prompt_settings(cfg: GenerateConfig, pipe) -> dict:
    """The schedule and guidance that run and the text-encoding settings, where they differ from the defaults (so a
    default job's spec, and its id, is what it always was); NGMS as resolved against the model's own."""
    schedule = check_scheduler(cfg.sampler, cfg.scheduler, pipe.schedule)
    min_sigma, all_steps = pipe.defaults.resolve(cfg.guidance_min_sigma, cfg.guidance_min_sigma_all_steps)
    ngms = min_sigma > 0 and cfg.guidance_scale > 1
    return ({"scheduler": schedule} if schedule != "normal" else {}) | \
        ({"clip_skip": cfg.clip_skip} if cfg.clip_skip != 1 else {}) | \
        ({"guidance_rescale": cfg.guidance_rescale} if cfg.guidance_rescale else {}) | \
        ({"guidance_min_sigma": min_sigma} if ngms else {}) | \
        ({"guidance_min_sigma_all_steps": True} if ngms and all_steps else {})


def prompt_params(cfg: GenerateConfig, pipe) -> dict[str, str]:
    """Their PNG fields, in A1111's names."""
    names = {"scheduler": "Schedule type", "clip_skip": "Clip skip", "guidance_rescale": "Guidance rescale",
             "guidance_min_sigma": NGMS, "guidance_min_sigma_all_steps": NGMS_ALL}
    values = prompt_settings(cfg, pipe)
    values = values | ({"scheduler": SCHEDULE_A1111[values["scheduler"]]} if "scheduler" in values else {})
    return {names[k]: f"{v:g}" if isinstance(v, float) else str(v) for k, v in values.items()}


def check(pipe, cfg: GenerateConfig, batch: int, *, inpainting: bool) -> tuple[int, int]:
    """The checks that need the model (its native size, schedule, text encoder, UNet and the free memory), before
    any work; ValueError naming the setting. Returns the (height, width) that will be made."""
    height, width = pipe.check_size(cfg.height, cfg.width)
    get_sampler(cfg.sampler, pipe.schedule, cfg.scheduler, eta=cfg.eta).set_timesteps(cfg.steps)
    if cfg.clip_skip > pipe.conditioner.max_clip_skip:
        raise ValueError(f"clip_skip {cfg.clip_skip} is more than this model's text encoders allow "
                         f"({pipe.conditioner.max_clip_skip})")
    pipe.check_unet(inpainting=inpainting)
    need = pipe.estimate_step_bytes(batch, height, width, guidance=cfg.guidance_scale > 1)
    free = free_memory(pipe.device)
    if need > free:
        raise ValueError(f"a batch of {batch} at {width}x{height} needs about {need / 2**30:.1f} GiB for one "
                         f"denoising step, more than the {free / 2**30:.1f} GiB free")
    return height, width


def free_memory(device) -> int:
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available
