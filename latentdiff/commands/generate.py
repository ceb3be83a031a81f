"""Batch generation: the job behind `scripts/txt2img.py` and `latentdiff generate`.

A job's inputs are its prompts, paired in order with its init images and masks when there are any (image-to-image,
inpainting; each list has one entry, or as many as the longest). Image k of a job (inputs × n_iter × n_samples, in
that order) gets seed `base seed + k` and the file `OUTDIR/samples/{first + k:05d}.png`, where the job's range starts
at `first` (commands/outdir.py: the folder's manifest of jobs). So a rerun after a kill makes exactly the missing
images of that job, a different job continues the numbering, and `accelerate launch --num_processes N` splits the
images round-robin with none made twice.
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..adapters import (LORA_SUFFIXES, adapter_name, embedding_files, find_lora, lora_hash, lora_tags,
                        read_embedding)
from ..config import DEFAULTS, GenerateConfig
from ..data.datasets import IMAGE_EXTENSIONS, UNREADABLE
from ..devices import process_state
from ..errors import ModelError, UsageError, first_line
from ..files import file_sha256, remove_leftovers
from ..generation import (MASK_BLUR, NGMS, NGMS_ALL, STRENGTH, applied_loras, check, generate, load_model, png_params,
                          prompt_settings)
from ..images import check_mask_blur, rounded_size, size_of
from ..pipeline import MAX_SEED, MODEL_SUFFIXES
from ..pngmeta import read_params, save_png, write_numbered
from ..precision import PRECISIONS, precision_name
from ..schedulers import SAMPLERS, SCHEDULERS, check_scheduler, schedule_from_a1111
from ..schedulers.schedules import start_index
from .outdir import claim_range

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Picture:
    """An init image or mask read from disk (converted to RGB or gray by the pipeline)."""

    path: Path
    image: object  # PIL.Image.Image


@dataclass(frozen=True)
class Input:
    prompt: str
    init: Picture | None = None
    mask: Picture | None = None


@dataclass
class Item:
    index: int
    prompt: str
    seed: int
    init: Picture | None = None
    mask: Picture | None = None


def build_parser(prog: str, positional_prompt: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Generate images from text prompts with a latent diffusion model, "
                                "or from init images (image-to-image) and masks (inpainting).")
    if positional_prompt:
        p.add_argument("prompt", nargs="?", help="the text prompt")
    else:
        p.add_argument("--prompt", help="the text prompt")
    p.add_argument("--from-file", type=Path, help="a text file with one prompt per line")
    p.add_argument("--from-png", type=Path, help="reproduce the image whose generation parameters this PNG carries")
    p.add_argument("--negative-prompt", default=DEFAULTS.negative_prompt, help="what the image should not show")
    p.add_argument("--model", help="diffusers-format folder or SD 1.x/2.x/XL .safetensors/.ckpt (default: the shipped model)")
    p.add_argument("--outdir", type=Path, default=Path("outputs/txt2img"), help="writes OUTDIR/samples/NNNNN.png and a grid")
    p.add_argument("--n-samples", type=int, default=1, help="batch size: images generated together")
    p.add_argument("--n-iter", type=int, default=1, help="how many batches per prompt")
    p.add_argument("--steps", type=int, default=DEFAULTS.steps, help=f"sampling steps (default {DEFAULTS.steps})")
    p.add_argument("--scale", type=float, default=DEFAULTS.guidance_scale,
                   help=f"classifier-free guidance scale (default {DEFAULTS.guidance_scale})")
    p.add_argument("--sampler", default=DEFAULTS.sampler, help=f"one of {', '.join(SAMPLERS)} (default {DEFAULTS.sampler})")
    p.add_argument("--eta", type=float, default=DEFAULTS.eta, help="DDIM eta (0 = deterministic)")
    p.add_argument("--seed", type=int, default=42, help="seed of the first image; image k uses seed + k")
    p.add_argument("--init-image", type=Path, help="image-to-image: an image file, or a folder whose images are taken "
                   "in name order (one prompt for all, or one prompt each)")
    p.add_argument("--strength", type=float, default=None, help="share of the steps run from the noised init image, "
                   f"in (0, 1] (default {DEFAULTS.strength:g}; {DEFAULTS.inpaint_strength:g} with --mask)")
    p.add_argument("--mask", type=Path, help="inpainting: a mask file or folder (white = repaint, black = keep), one "
                   "for every init image or one each; a mask must have its init image's size")
    p.add_argument("--mask-blur", type=float, default=None,
                   help=f"feather of the mask's edge in pixels, a Gaussian sigma (default {DEFAULTS.mask_blur:g})")
    p.add_argument("--H", type=int, default=None,
                   help="image height in pixels (default: the init image's, rounded down to a multiple of 8, else the model's native size)")
    p.add_argument("--W", type=int, default=None,
                   help="image width in pixels (default: the init image's, rounded down to a multiple of 8, else the model's native size)")
    p.add_argument("--scheduler", default=DEFAULTS.scheduler,
                   help=f"noise schedule, one of {', '.join(SCHEDULERS)} (default: the model's own, usually normal)")
    p.add_argument("--clip-skip", type=int, default=DEFAULTS.clip_skip,
                   help="1 = the text encoder's last layer (default), 2 = the one before (A1111's numbering)")
    p.add_argument("--guidance-rescale", type=float, default=DEFAULTS.guidance_rescale,
                   help="φ of Lin et al. 2023, 0–1 (default 0: off); for zero-terminal-SNR / v-prediction models")
    p.add_argument("--guidance-min-sigma", type=float, default=DEFAULTS.guidance_min_sigma, metavar="SIGMA",
                   help="A1111's NGMS: below this noise level σ, skip the unconditional pass on every other step "
                   "(0: never; default: the model's own, off unless its latentdiff.json names one)")
    p.add_argument("--guidance-min-sigma-all-steps", action=argparse.BooleanOptionalAction,
                   default=DEFAULTS.guidance_min_sigma_all_steps,
                   help="skip it on every step below that σ (A1111's \"NGMS all steps\"; default: the model's own)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA file applied to every image, at SCALE (default 1); repeat for several")
    p.add_argument("--lora-dir", type=Path, help="the folder the prompts' <lora:name:weight> tags name files in")
    p.add_argument("--embedding", action="append", default=[], type=Path, metavar="PATH",
                   help="a textual-inversion embedding, used by its file name in prompts; repeat for several")
    p.add_argument("--embeddings-dir", type=Path, help="load every embedding file in this folder (as A1111 does)")
    p.add_argument("--precision", default=DEFAULTS.precision, help=f"one of {', '.join(PRECISIONS)}")
    p.add_argument("--skip-grid", action="store_true", help="do not write a grid of the samples")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_args(args) -> list[Input]:
    """Validate everything that can be checked before loading the model; returns the job's inputs."""
    if args.from_png is not None:
        if not args.from_png.is_file():
            raise UsageError(f"--from-png {args.from_png} does not exist; expected a PNG written by latentdiff")
        try:
            params = read_params(args.from_png)
            eta = float(params.extra.get("Eta", args.eta))
        except (OSError, ValueError, SyntaxError) as e:  # not an image, no `parameters` chunk, or text that does not parse
            raise UsageError(f"cannot replay --from-png {args.from_png}: {first_line(e).rstrip('.')}") from None
        yours = {name: getattr(args, name) for name in sorted(getattr(args, "given", set()) & _OVERRIDABLE)}
        args.prompt, args.negative_prompt, args.seed = params.prompt, params.negative_prompt, params.seed
        args.steps, args.scale, args.sampler = params.steps, params.cfg_scale, params.sampler
        args.W, args.H = params.width, params.height
        args.precision = params.extra.get("Precision", args.precision)
        args.eta = eta
        args.n_samples = args.n_iter = 1
        _replay_init_settings(args, params.extra)
        _replay_prompt_settings(args, params)
        for name, value in yours.items():  # what you give on the command line wins over the PNG
            setattr(args, name, value)
        if yours:
            logger.warning("--from-png %s: your %s replace the PNG's", args.from_png,
                           ", ".join("--" + name.replace("_", "-") for name in yours))
    if args.prompt is not None and args.from_file is not None:
        raise UsageError("give either a prompt or --from-file, not both")
    if args.from_file is not None:
        try:
            lines = args.from_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read prompt file {args.from_file} ({e.__class__.__name__}); expected a UTF-8 text file, one prompt per line")
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise UsageError(f"prompt file {args.from_file} has no prompts; expected one prompt per line")
    elif args.prompt is not None:
        prompts = [args.prompt]
    else:
        raise UsageError("no prompt given; pass a prompt, --from-file FILE or --from-png FILE")
    for name, value in (("H", args.H), ("W", args.W)):
        if value is not None and (value <= 0 or value % 8):
            raise UsageError(f"--{name} must be a positive multiple of 8, got {value}")
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    inputs = check_init_args(args, prompts)
    if args.n_samples < 1 or args.n_iter < 1:
        raise UsageError(f"--n-samples and --n-iter must be at least 1, got {args.n_samples} and {args.n_iter}")
    if not math.isfinite(args.scale):
        raise UsageError(f"--scale must be a finite number (≤ 1 turns guidance off), got {args.scale}")
    if not 0 <= args.eta <= 1:
        raise UsageError(f"--eta must be between 0 and 1, got {args.eta}")
    if args.clip_skip < 1:
        raise UsageError(f"--clip-skip must be at least 1 (1 = the last layer), got {args.clip_skip}")
    if not 0 <= args.guidance_rescale <= 1:
        raise UsageError(f"--guidance-rescale must be between 0 and 1, got {args.guidance_rescale}")
    if args.guidance_min_sigma is not None and not (math.isfinite(args.guidance_min_sigma) and args.guidance_min_sigma >= 0):
        raise UsageError(f"--guidance-min-sigma must be a noise level ≥ 0 (0 = off), got {args.guidance_min_sigma}")
    if args.scheduler is not None and args.sampler in SAMPLERS:
        try:
            check_scheduler(args.sampler, args.scheduler)
        except ValueError as e:
            raise UsageError(f"--scheduler: {e}") from None
    last_seed = args.seed + len(inputs) * args.n_iter * args.n_samples - 1
    if args.seed < 0 or last_seed > MAX_SEED:
        raise UsageError(f"--seed must be from 0 to 2**64 - 1 for every image (seed + k), got {args.seed} (last {last_seed})")
    if args.sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {args.sampler!r}; expected one of: {', '.join(SAMPLERS)}")
    if args.precision not in PRECISIONS:
        raise UsageError(f"unknown precision {args.precision!r}; expected one of: {', '.join(PRECISIONS)}")
    if args.model is not None:
        check_model(Path(args.model))
    check_loras(args, [it.prompt for it in inputs])
    check_embeddings(args)
    check_outdir(args.outdir)
    return inputs


def check_model(model: Path) -> None:
    if not model.exists():
        raise UsageError(f"model {model} does not exist; expected a diffusers-format folder or a .safetensors/.ckpt file")
    if model.is_file() and model.suffix.lower() not in MODEL_SUFFIXES:
        raise UsageError(f"model file {model} has an unknown extension; expected .safetensors or .ckpt")
    if model.is_file() and not os.access(model, os.R_OK):
        raise UsageError(f"model file {model} is not readable")


def check_outdir(outdir: Path) -> None:
    """A folder that exists and is writable, or one that can be made."""
    existing = next(p for p in [outdir, *outdir.parents] if p.exists())
    if not existing.is_dir():
        raise UsageError(f"output directory {outdir} cannot be made: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {outdir} is not writable")


def check_loras(args, prompts: list[str]) -> None:
    """--lora PATH[:SCALE] files and the prompts' <lora:…> tags, each found in --lora-dir (or among --lora)."""
    args.loras = []
    for spec in args.lora:
        path, _, scale = spec.rpartition(":") if not Path(spec).is_file() and ":" in spec else (spec, "", "1")
        try:
            scale = float(scale)
        except ValueError:
            raise UsageError(f"--lora {spec}: the scale after the last ':' is not a number; expected PATH[:SCALE]") from None
        if not Path(path).is_file() or Path(path).suffix.lower() not in LORA_SUFFIXES:
            raise UsageError(f"--lora {path} is not a .safetensors file; expected a LoRA file, optionally :SCALE")
        args.loras.append((Path(path), scale, adapter_name(Path(path).stem)))
    if args.lora_dir is not None and not args.lora_dir.is_dir():
        raise UsageError(f"--lora-dir {args.lora_dir} is not a folder")
    given = {name for _, _, name in args.loras}
    args.tag_files = {}
    for prompt in prompts:
        try:
            for name in lora_tags(prompt)[1]:
                if adapter_name(name) in given or name in args.tag_files:
                    continue
                if args.lora_dir is None:
                    raise ValueError(f"the prompt names <lora:{name}>; give --lora-dir, the folder of LoRA files")
                args.tag_files[name] = find_lora(name, args.lora_dir)
        except ValueError as e:
            raise UsageError(str(e).rstrip(".")) from None


def check_embeddings(args) -> None:
    """--embedding files and --embeddings-dir's, each one readable embedding."""
    if args.embeddings_dir is not None and not args.embeddings_dir.is_dir():
        raise UsageError(f"--embeddings-dir {args.embeddings_dir} is not a folder")
    found = embedding_files(args.embeddings_dir) if args.embeddings_dir is not None else []
    args.embedding_files = [*args.embedding, *found]
    for path in args.embedding_files:
        if not path.is_file():
            raise UsageError(f"--embedding {path} does not exist")
        try:
            read_embedding(path)
        except ValueError as e:
            raise UsageError(str(e).rstrip(".")) from None


# Settings a flag given with --from-png changes (the rest of the replay stays the PNG's)
_OVERRIDABLE = {"prompt", "negative_prompt", "seed", "steps", "scale", "sampler", "scheduler", "eta", "clip_skip",
                "guidance_rescale", "guidance_min_sigma", "guidance_min_sigma_all_steps", "W", "H", "precision", "n_samples", "n_iter", "strength", "mask_blur"}

# Fields --from-png restores, or that describe the run and change nothing (the model is given by --model)
_REPLAYED = {"Precision", "Eta", "Schedule type", "Clip skip", "Guidance rescale", "CFG Rescale", "CFG Rescale φ", NGMS, NGMS_ALL,
             "Denoising strength", "Mask blur", "Model", "Model hash", "Version", "Lora hashes",
             "TI hashes"}


def _replay_prompt_settings(args, params) -> None:
    """Schedule, clip skip, guidance rescale and NGMS from the PNG (no NGMS field: made without it, whatever the
    model's own); fields latentdiff cannot honour are named in one warning."""
    extra = params.extra
    try:
        if "Schedule type" in extra:
            args.scheduler = schedule_from_a1111(extra["Schedule type"])
        args.clip_skip = int(extra.get("Clip skip", args.clip_skip))
        rescale = next((extra[k] for k in ("Guidance rescale", "CFG Rescale", "CFG Rescale φ") if k in extra), None)
        args.guidance_rescale = args.guidance_rescale if rescale is None else float(rescale)
        args.guidance_min_sigma = float(extra.get(NGMS, 0))
        args.guidance_min_sigma_all_steps = extra.get(NGMS_ALL, "False") == "True"
    except ValueError as e:
        raise UsageError(f"cannot replay --from-png {args.from_png}: {e}") from None
    ignored = sorted(set(extra) - _REPLAYED)
    if ignored:
        logger.warning("--from-png %s: latentdiff cannot honour %s; the image is made without them",
                       args.from_png, ", ".join(ignored))
    args.png_model_hash = params.model_hash


def _replay_init_settings(args, extra: dict) -> None:
    """--from-png of an image-to-image or inpainting PNG: its strength and mask blur; the init image and mask
    are not in the PNG, so they must be given again."""
    if STRENGTH not in extra or "Hires upscale" in extra:  # A1111's hires fix also writes a denoising strength
        return
    try:
        args.strength = float(extra[STRENGTH])
        args.mask_blur = float(extra[MASK_BLUR]) if MASK_BLUR in extra else None
    except ValueError:
        raise UsageError(f"--from-png {args.from_png}: unreadable {STRENGTH} or {MASK_BLUR} in its parameters") from None
    needs = "--init-image and --mask" if MASK_BLUR in extra else "--init-image"
    if args.init_image is None or (MASK_BLUR in extra and args.mask is None):
        raise UsageError(f"--from-png {args.from_png} was made from an init image ({STRENGTH} {args.strength:g}); "
                         f"pass the same {needs} to replay it")


def check_init_args(args, prompts: list[str]) -> list[Input]:
    """The job's inputs: prompts paired with init images and masks (each list: one entry, or as many as the
    longest); with an init image, strength and mask blur resolved and the size defaulting to the first image's."""
    given = {"--strength": args.strength, "--mask": args.mask, "--mask-blur": args.mask_blur}
    if args.init_image is None:
        for flag, value in given.items():
            if value is not None:
                raise UsageError(f"{flag} needs --init-image (image-to-image and inpainting start from a picture)")
        return [Input(p) for p in prompts]
    if args.mask is None and args.mask_blur is not None:
        raise UsageError("--mask-blur feathers an inpainting mask; pass --mask as well")
    if args.strength is None:
        args.strength = DEFAULTS.strength if args.mask is None else DEFAULTS.inpaint_strength
    try:
        start_index(args.steps, args.strength)
        if args.mask is not None:
            args.mask_blur = check_mask_blur(DEFAULTS.mask_blur if args.mask_blur is None else args.mask_blur)
    except ValueError as e:
        raise UsageError(str(e).replace("num_inference_steps", "--steps").replace("strength", "--strength")
                         .replace("mask_blur", "--mask-blur")) from None
    inits = read_pictures(args.init_image, "--init-image")
    masks = read_pictures(args.mask, "--mask") if args.mask is not None else [None]
    n = max(len(prompts), len(inits), len(masks))
    if any(len(x) not in (1, n) for x in (prompts, inits, masks)):
        raise UsageError(f"got {len(prompts)} prompts, {len(inits)} init images and {len(masks) if args.mask else 0} "
                         "masks; give one of each, or as many as the longest list")
    inputs = [Input(*(x[k] if len(x) > 1 else x[0] for x in (prompts, inits, masks))) for k in range(n)]
    for it in inputs:
        if it.mask is not None and size_of(it.mask.image) != size_of(it.init.image):
            (mh, mw), (ih, iw) = size_of(it.mask.image), size_of(it.init.image)
            raise UsageError(f"mask {it.mask.path} is {mw}x{mh} but init image {it.init.path} is {iw}x{ih}; "
                             "a mask must have its init image's size")
    height, width = size_of(inits[0].image)
    args.H = rounded_size(height) if args.H is None else args.H
    args.W = rounded_size(width) if args.W is None else args.W
    return inputs


def note_conversions(inputs: list[Input]) -> None:
    """Init images that are not RGB are converted (by the pipeline); say so once per file, after every check."""
    modes = {it.init.path: it.init.image.mode for it in inputs if it.init is not None and it.init.image.mode != "RGB"}
    for path, mode in modes.items():
        print(f"note: init image {path} is {mode}, converted to RGB", file=sys.stderr)


def read_pictures(path: Path, flag: str) -> list[Picture]:
    """A file, or a folder's images in name order, each read whole (a truncated file is found here)."""
    from PIL import Image

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise UsageError(f"{flag} folder {path} has no images ({'/'.join(IMAGE_EXTENSIONS)})")
    elif path.is_file():
        files = [path]
    else:
        raise UsageError(f"{flag} {path} does not exist; expected an image file or a folder of images")
    pictures = []
    for file in files:
        try:
            with Image.open(file) as image:
                image.load()
                pictures.append(Picture(file, image.copy()))
        except UNREADABLE as e:
            raise UsageError(f"cannot read {flag} {file}: {first_line(e)}") from None
    return pictures


def plan(inputs: list[Input], n_iter: int, n_samples: int, seed: int) -> list[Item]:
    per_input = n_iter * n_samples
    items = []
    for k in range(len(inputs) * per_input):
        it = inputs[k // per_input]
        items.append(Item(k, it.prompt, seed + k, it.init, it.mask))
    return items


def load(args):
    return load_model(args.model, device=process_state().device, precision=args.precision)


def check_against_model(args, pipe) -> tuple[int, int]:
    """The checks that need the model (its native size, schedule and dtype), before anything is written."""
    try:
        return check(pipe, recipe(args, args.H, args.W), args.n_samples, inpainting=args.mask is not None)
    except ValueError as e:
        raise UsageError(str(e).replace("height and width", "--H and --W").replace("num_inference_steps", "--steps")
                         .replace("clip_skip", "--clip-skip").replace("image= and mask_image=", "--init-image and --mask")
                         .replace("a batch of", "--n-samples").rstrip(".")
                         + ("; lower --n-samples" if "GiB free" in str(e) else "")) from None


def recipe(args, height: int | None, width: int | None) -> GenerateConfig:
    """The job's settings as the library's config (strength and mask blur only where they apply)."""
    return GenerateConfig(args.negative_prompt, args.steps, args.scale, args.sampler, args.eta, args.scheduler,
                          args.clip_skip, args.guidance_rescale, args.guidance_min_sigma,
                          args.guidance_min_sigma_all_steps, width, height, args.precision,
                          strength=args.strength, mask_blur=args.mask_blur)


def job_spec(args, inputs: list[Input], pipe, width: int, height: int) -> dict:
    """Everything that decides which images a job makes (not how fast: batch size and processes are left out
    only where they change nothing, so n_samples stays: it orders the job). Init images and masks count by path
    and content; a text-to-image job's spec has no such keys (so its id is what it always was)."""
    spec = {"prompts": [it.prompt for it in inputs], "negative_prompt": args.negative_prompt, "n_iter": args.n_iter,
            "n_samples": args.n_samples, "seed": args.seed, "steps": args.steps, "scale": args.scale,
            "sampler": args.sampler, "eta": args.eta, "width": width, "height": height,
            **prompt_settings(recipe(args, height, width), pipe),
            "precision": precision_name(pipe.dtype), "model": str(Path(args.model).resolve()) if args.model else "default"}
    for key, pictures in (("init_images", [it.init for it in inputs]), ("masks", [it.mask for it in inputs])):
        if pictures[0] is not None:
            spec[key] = [{"path": str(p.path.resolve()), "sha256": file_sha256(p.path)} for p in pictures]
    if args.loras:
        spec["loras"] = [{"hash": lora_hash(path), "scale": scale} for path, scale, _ in args.loras]
    if args.embedding_files:
        spec["embeddings"] = [file_sha256(path) for path in args.embedding_files]
    if args.tag_files:
        spec["tag_loras"] = {name: lora_hash(path) for name, path in sorted(args.tag_files.items())}
    if args.init_image is not None:
        spec["strength"] = args.strength
    if args.mask is not None:
        spec["mask_blur"] = args.mask_blur
    return spec


def run(args, inputs: list[Input]) -> int:
    from tqdm.auto import tqdm

    state = process_state()
    t0 = time.perf_counter()
    pipe = load(args)
    load_s = time.perf_counter() - t0
    height, width = check_against_model(args, pipe)
    for path, scale, name in args.loras:
        try:
            pipe.load_lora(path, scale=scale, name=name)
        except (ValueError, OSError) as e:
            raise UsageError(f"cannot apply --lora {path}: {first_line(e).rstrip('.')}") from None
    for path in args.embedding_files:
        try:
            pipe.load_embedding(path)
        except ValueError as e:
            raise UsageError(f"cannot use embedding {path}: {first_line(e).rstrip('.')}") from None
    note_conversions(inputs)
    items = plan(inputs, args.n_iter, args.n_samples, args.seed)

    # which files are this job's: its range in the folder's manifest (another job's files are never touched)
    samples = args.outdir / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    remove_leftovers(samples)
    first = claim_range(args.outdir, job_spec(args, inputs, pipe, width, height), len(items))
    path = {it.index: samples / f"{first + it.index:05d}.png" for it in items}
    mine = [it for it in items[state.process_index :: state.num_processes] if not path[it.index].exists()]

    cfg = recipe(args, height, width)
    given = {name: file for file, _, name in args.loras}
    if getattr(args, "png_model_hash", "") and pipe.model_hash and args.png_model_hash != pipe.model_hash:
        logger.warning("--from-png %s was made with model hash %s; the loaded model's is %s: the image will differ",
                       args.from_png, args.png_model_hash, pipe.model_hash)
    made, t1 = 0, time.perf_counter()
    bar = tqdm(total=len(mine), disable=args.no_progress or not mine, desc=f"images[{state.process_index}]", unit="img")
    batches = [group for b in range(0, len(mine), args.n_samples)  # one LoRA tag set per call: they apply batch-wide
               for group in _by_tags(mine[b : b + args.n_samples])]
    for batch in batches:
        out = generate(pipe, cfg, [it.prompt for it in batch], [it.seed for it in batch],
                       images=None if args.init_image is None else [it.init.image for it in batch],
                       masks=None if args.mask is None else [it.mask.image for it in batch], lora_dir=args.lora_dir)
        for it, image in zip(batch, out.images):
            params = png_params(pipe, cfg, it.prompt, it.seed, init=args.init_image is not None, mask=args.mask is not None,
                                loras=applied_loras(it.prompt, given, args.tag_files))
            try:
                save_png(path[it.index], image, params, exclusive=True)
                made += 1
            except FileExistsError:  # the same job, run at the same time elsewhere, made this very image
                pass
        bar.update(len(batch))
    bar.close()
    gen_s = time.perf_counter() - t1

    state.wait_for_everyone()
    if state.is_main_process and made and not args.skip_grid:
        _write_grid(args.outdir, [path[it.index] for it in items], args.n_samples)
    rate = f" ({gen_s / made:.2f} s/image)" if made else ""
    done = "" if made or not items else f" (all {len(items)} images of this job were already there)"
    print(f"{made} images in {gen_s:.1f} s{rate}; model loaded in {load_s:.1f} s; output in {samples}{done}"
          + (f" [process {state.process_index} of {state.num_processes}]" if state.num_processes > 1 else ""), file=sys.stderr)
    return 0


def _by_tags(batch: list[Item]) -> list[list[Item]]:
    """The batch split by the prompts' <lora:…> tags, order kept within each part (each image has its own seed,
    so the split changes no image)."""
    groups: dict[tuple, list[Item]] = {}
    for it in batch:
        groups.setdefault(tuple(sorted(lora_tags(it.prompt)[1].items())), []).append(it)
    return list(groups.values())


def _write_grid(outdir: Path, files: list[Path], n_cols: int) -> None:
    """One more grid file (grid-NNNN.png) of the job's finished images; existing grids are never replaced."""
    from PIL import Image

    images = [Image.open(f).convert("RGB") for f in files if f.exists()]
    if not images:
        return
    cols = min(n_cols, len(images)) if n_cols > 1 else math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    write_numbered(outdir, lambda n: f"grid-{n:04d}.png", grid)


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The options given on the command line (argparse alone cannot tell a default from the same value typed)."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def main(argv: list[str] | None = None, *, prog: str = "txt2img.py", positional_prompt: bool = False) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser(prog, positional_prompt)
    args = parser.parse_args(argv)
    args.given = explicit_flags(parser, argv)
    try:
        inputs = check_args(args)
        return run(args, inputs)
    except (UsageError, ModelError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a file-size limit, a folder that vanished: the path and the cause
        where = e.filename or args.outdir
        print(f"{prog}: error: cannot write {where}: {e.strerror or e}", file=sys.stderr)
        return 1
