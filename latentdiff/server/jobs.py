"""A1111 generation requests as worker jobs.

A request becomes one pipeline call per batch (n_iter batches of batch_size images) through `generation.generate`,
the batch script's own mapping of settings to the pipeline, and each image gets the batch script's PNG
`parameters` (`generation.png_params`). Image k of a request has seed `seed + k`, as A1111 and the batch script.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from fastapi import HTTPException

from ..config import DEFAULTS, GenerateConfig
from ..errors import ModelError
from ..generation import applied_loras, check, generate, png_params
from ..images import rounded_size
from ..pipeline import MAX_SEED
from ..pngmeta import write_numbered
from ..schedulers import SAMPLERS
from ..schedulers.schedules import start_index
from .schema import MAX_PIXELS, Txt2Img
from .worker import Interrupted


@dataclass
class Result:
    images: list = field(default_factory=list)  # PIL images
    infotexts: list[str] = field(default_factory=list)  # each image's PNG `parameters`
    info: dict = field(default_factory=dict)  # A1111's info (without infotexts)
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)  # where save_images wrote them


def settings(req: Txt2Img, notes: list[str], *, init: bool) -> GenerateConfig:
    """The request as the library's config; what it asks that latentdiff does differently goes to `notes`."""
    sampler, schedule = req.sampler_and_schedule()
    size = []
    for name in ("width", "height"):
        value = getattr(req, name)
        if value is not None and value % 8:
            notes.append(f"{name} {value} rounded down to {value // 8 * 8} (a multiple of 8, as A1111)")
            value = value // 8 * 8
        size.append(value)
    if req.width and req.height and req.width * req.height * req.batch_size > MAX_PIXELS:
        raise HTTPException(422, f"width × height × batch_size is {req.width * req.height * req.batch_size} pixels; "
                                 f"the server makes at most {MAX_PIXELS} in one batch")
    eta = DEFAULTS.eta
    if req.eta is not None and "eta" in SAMPLERS[sampler].options:
        eta = req.eta
    elif req.eta not in (None, 1) and SAMPLERS[sampler].stochastic:  # A1111's ancestral samplers scale noise by eta
        notes.append(f"eta {req.eta:g} ignored: latentdiff's {sampler} runs at eta 1")
    clip_skip = req.override_settings.get("CLIP_stop_at_last_layers", DEFAULTS.clip_skip)
    if not isinstance(clip_skip, int) or clip_skip < 1:
        raise HTTPException(422, f"override_settings CLIP_stop_at_last_layers must be a whole number ≥ 1, got {clip_skip!r}")
    all_steps = req.override_settings.get("s_min_uncond_all")
    if all_steps is not None and not isinstance(all_steps, bool):
        raise HTTPException(422, f"override_settings s_min_uncond_all must be true or false, got {all_steps!r}")
    strength = req.denoising_strength if init and req.denoising_strength else DEFAULTS.strength
    return GenerateConfig(req.negative_prompt, req.steps, req.cfg_scale, sampler, eta, schedule, clip_skip,
                          guidance_min_sigma=req.s_min_uncond, guidance_min_sigma_all_steps=all_steps,
                          width=size[0], height=size[1], strength=strength,
                          mask_blur=getattr(req, "mask_blur", DEFAULTS.mask_blur))


def generation_job(req: Txt2Img, catalog, outdir: Path, *, images=None, mask=None, kind: str = "txt2img"):
    """The job (run on the worker thread) that makes the request's images; images/mask: decoded PIL images."""
    notes = req.notes()
    cfg = settings(req, notes, init=images is not None)
    if images is not None:  # unset sizes follow the (first) init image, as the pipeline's own default
        cfg = replace(cfg, width=cfg.width or rounded_size(images[0].width), height=cfg.height or rounded_size(images[0].height))
    lora_files = catalog.lora_files(req.prompt)  # before queueing: a bad tag is this request's 400
    seed = secrets.randbelow(2**32) if req.seed == -1 else req.seed
    count = req.n_iter * req.batch_size
    if seed + count - 1 > MAX_SEED:
        raise HTTPException(422, f"seed {seed} + {count - 1} images is beyond 2**64 - 1")
    seeds = [seed + k for k in range(count)]

    def run(worker) -> Result:
        pipe = worker.pipe
        try:
            height, width = check(pipe, cfg, req.batch_size, inpainting=mask is not None)
        except ValueError as e:
            raise HTTPException(422, str(e).rstrip(".")) from None
        done = replace(cfg, height=height, width=width)
        steps_run = cfg.steps - (start_index(cfg.steps, cfg.strength) if images is not None else 0)
        result, interrupted = Result(notes=notes), False
        for b in range(req.n_iter):
            worker.begin_batch(b, req.n_iter, steps_run)
            first = b * req.batch_size
            batch = seeds[first:first + req.batch_size]
            inits = None if images is None else [images[k % len(images)] for k in range(first, first + len(batch))]
            try:
                out = generate(pipe, done, [req.prompt] * len(batch), batch, images=inits,
                               masks=None if mask is None else [mask] * len(batch), lora_dir=catalog.lora_dir,
                               callback=worker.on_step)
            except Interrupted:
                interrupted = True
                notes.append(f"interrupted: {len(result.images)} of {count} images made")
                break
            except ModelError:  # NaN or blank output: the model failed, not the request (a 500)
                raise
            except ValueError as e:  # settings the pipeline refuses before it starts (an init image's size, …)
                raise HTTPException(422, str(e).rstrip(".")) from None
            for image, s in zip(out.images, batch):
                text = png_params(pipe, done, req.prompt, s, init=images is not None, mask=mask is not None,
                                  loras=applied_loras(req.prompt, {}, lora_files)).to_text()
                result.images.append(image)
                result.infotexts.append(text)
                if req.save_images:
                    folder = outdir / f"{kind}-images"
                    folder.mkdir(parents=True, exist_ok=True)
                    result.files.append(write_numbered(folder, lambda n, s=s: f"{n:05d}-{s}.png", image, text))
        result.info = a1111_info(req, done, pipe, seeds[:len(result.images)] or seeds, interrupted,
                                 init=images is not None, inpainting=mask is not None and pipe.is_inpainting_model)
        return result

    return run


def a1111_info(req: Txt2Img, cfg: GenerateConfig, pipe, seeds: list[int], interrupted: bool, *, init: bool,
               inpainting: bool) -> dict:
    """The fields of A1111's `info` JSON that clients read (infotexts and notes are added by the caller)."""
    n = len(seeds)
    return {
        "prompt": req.prompt, "all_prompts": [req.prompt] * n, "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * n, "seed": seeds[0], "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0, "width": cfg.width, "height": cfg.height,
        "sampler_name": SAMPLERS[cfg.sampler].a1111, "scheduler": cfg.scheduler or "automatic",
        "cfg_scale": cfg.guidance_scale, "steps": cfg.steps, "batch_size": req.batch_size, "n_iter": req.n_iter,
        "restore_faces": False, "sd_model_name": pipe.name, "sd_model_hash": pipe.model_hash,
        "denoising_strength": cfg.strength if init else None, "clip_skip": cfg.clip_skip,
        "is_using_inpainting_conditioning": inpainting,
        "index_of_first_image": 0, "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "interrupted": interrupted, "version": "latentdiff",
    }

