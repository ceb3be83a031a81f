"""Batch text-to-image: the job behind `scripts/txt2img.py` and `latentdiff generate`.

Image k of a job (prompts × n_iter × n_samples, in that order) gets seed `base seed + k` and the file
`OUTDIR/samples/{first + k:05d}.png`, where the job's range starts at `first` (commands/outdir.py: the folder's
manifest of jobs). So a rerun after a kill makes exactly the missing images of that job, a different job continues
the numbering, and `accelerate launch --num_processes N` splits the images round-robin with none made twice.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import DEFAULTS
from ..devices import process_state
from ..errors import ModelError
from ..pipeline import MAX_SEED, MODEL_SUFFIXES, load_pipeline
from ..pngmeta import GenerationParams, read_params, save_png, write_png
from ..precision import PRECISIONS, precision_name
from ..files import remove_leftovers
from ..schedulers import SAMPLERS, get_sampler
from .outdir import claim_range


class UsageError(ValueError):
    """Bad input: reported as one sentence, exit code 2, nothing written."""


@dataclass
class Item:
    index: int
    prompt: str
    seed: int


def build_parser(prog: str, positional_prompt: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Generate images from text prompts with a latent diffusion model.")
    if positional_prompt:
        p.add_argument("prompt", nargs="?", help="the text prompt")
    else:
        p.add_argument("--prompt", help="the text prompt")
    p.add_argument("--from-file", type=Path, help="a text file with one prompt per line")
    p.add_argument("--from-png", type=Path, help="reproduce the image whose generation parameters this PNG carries")
    p.add_argument("--negative-prompt", default=DEFAULTS.negative_prompt, help="what the image should not show")
    p.add_argument("--model", help="diffusers-format folder or SD 1.x/2.x .safetensors/.ckpt (default: the shipped model)")
    p.add_argument("--outdir", type=Path, default=Path("outputs/txt2img"), help="writes OUTDIR/samples/NNNNN.png and a grid")
    p.add_argument("--n-samples", type=int, default=1, help="batch size: images generated together")
    p.add_argument("--n-iter", type=int, default=1, help="how many batches per prompt")
    p.add_argument("--steps", type=int, default=DEFAULTS.steps, help=f"sampling steps (default {DEFAULTS.steps})")
    p.add_argument("--scale", type=float, default=DEFAULTS.guidance_scale,
                   help=f"classifier-free guidance scale (default {DEFAULTS.guidance_scale})")
    p.add_argument("--sampler", default=DEFAULTS.sampler, help=f"one of {', '.join(SAMPLERS)} (default {DEFAULTS.sampler})")
    p.add_argument("--eta", type=float, default=DEFAULTS.eta, help="DDIM eta (0 = deterministic)")
    p.add_argument("--seed", type=int, default=42, help="seed of the first image; image k uses seed + k")
    p.add_argument("--H", type=int, default=None, help="image height in pixels (default: the model's native size)")
    p.add_argument("--W", type=int, default=None, help="image width in pixels (default: the model's native size)")
    p.add_argument("--precision", default=DEFAULTS.precision, help=f"one of {', '.join(PRECISIONS)}")
    p.add_argument("--skip-grid", action="store_true", help="do not write a grid of the samples")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_args(args) -> list[str]:
    """Validate everything that can be checked before loading the model; returns the prompt list."""
    if args.from_png is not None:
        if not args.from_png.is_file():
            raise UsageError(f"--from-png {args.from_png} does not exist; expected a PNG written by latentdiff")
        try:
            params = read_params(args.from_png)
            eta = float(params.extra.get("Eta", args.eta))
        except (OSError, ValueError, SyntaxError) as e:  # not an image, no `parameters` chunk, or text that does not parse
            reason = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
            raise UsageError(f"cannot replay --from-png {args.from_png}: {reason.rstrip('.')}") from None
        args.prompt, args.negative_prompt, args.seed = params.prompt, params.negative_prompt, params.seed
        args.steps, args.scale, args.sampler = params.steps, params.cfg_scale, params.sampler
        args.W, args.H = params.width, params.height
        args.precision = params.extra.get("Precision", args.precision)
        args.eta = eta
        args.n_samples = args.n_iter = 1
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
    if args.n_samples < 1 or args.n_iter < 1:
        raise UsageError(f"--n-samples and --n-iter must be at least 1, got {args.n_samples} and {args.n_iter}")
    if not math.isfinite(args.scale):
        raise UsageError(f"--scale must be a finite number (≤ 1 turns guidance off), got {args.scale}")
    if not 0 <= args.eta <= 1:
        raise UsageError(f"--eta must be between 0 and 1, got {args.eta}")
    last_seed = args.seed + len(prompts) * args.n_iter * args.n_samples - 1
    if args.seed < 0 or last_seed > MAX_SEED:
        raise UsageError(f"--seed must be from 0 to 2**64 - 1 for every image (seed + k), got {args.seed} (last {last_seed})")
    if args.sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {args.sampler!r}; expected one of: {', '.join(SAMPLERS)}")
    if args.precision not in PRECISIONS:
        raise UsageError(f"unknown precision {args.precision!r}; expected one of: {', '.join(PRECISIONS)}")
    if args.model is not None:
        model = Path(args.model)
        if not model.exists():
            raise UsageError(f"model {model} does not exist; expected a diffusers-format folder or a .safetensors/.ckpt file")
        if model.is_file() and model.suffix.lower() not in MODEL_SUFFIXES:
            raise UsageError(f"model file {model} has an unknown extension; expected .safetensors or .ckpt")
        if model.is_file() and not os.access(model, os.R_OK):
            raise UsageError(f"model file {model} is not readable")
    existing = next(p for p in [args.outdir, *args.outdir.parents] if p.exists())
    if not existing.is_dir():
        raise UsageError(f"output directory {args.outdir} cannot be made: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {args.outdir} is not writable")
    return prompts


def plan(prompts: list[str], n_iter: int, n_samples: int, seed: int) -> list[Item]:
    per_prompt = n_iter * n_samples
    return [Item(k, prompts[k // per_prompt], seed + k) for k in range(len(prompts) * per_prompt)]


def load(args):
    try:
        return load_pipeline(args.model, device=process_state().device, precision=args.precision)
    except ModelError:
        raise
    except Exception as e:  # a corrupt or foreign file: say which, in one sentence
        first_line = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
        raise ModelError(f"cannot load model {args.model or 'default'}: {first_line}") from e


def check_against_model(args, pipe) -> tuple[int, int]:
    """The checks that need the model (its native size, schedule and dtype), before anything is written."""
    try:
        height, width = pipe.check_size(args.H, args.W)
        get_sampler(args.sampler, pipe.schedule, eta=args.eta).set_timesteps(args.steps)
    except ValueError as e:
        raise UsageError(str(e).replace("height and width", "--H and --W").replace("num_inference_steps", "--steps")
                         .rstrip(".")) from None
    need = pipe.estimate_step_bytes(args.n_samples, height, width, guidance=args.scale > 1)
    free = free_memory(pipe.device)
    if need > free:
        raise UsageError(f"--n-samples {args.n_samples} at {width}x{height} needs about {need / 2**30:.1f} GiB for one "
                         f"denoising step, more than the {free / 2**30:.1f} GiB free; lower --n-samples")
    return height, width


def free_memory(device) -> int:
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def job_spec(args, prompts: list[str], pipe, width: int, height: int) -> dict:
    """Everything that decides which images a job makes (not how fast: batch size and processes are left out
    only where they change nothing, so n_samples stays: it orders the job)."""
    return {"prompts": prompts, "negative_prompt": args.negative_prompt, "n_iter": args.n_iter,
            "n_samples": args.n_samples, "seed": args.seed, "steps": args.steps, "scale": args.scale,
            "sampler": args.sampler, "eta": args.eta, "width": width, "height": height,
            "precision": precision_name(pipe.dtype), "model": str(Path(args.model).resolve()) if args.model else "default"}


def run(args, prompts: list[str]) -> int:
    from tqdm.auto import tqdm

    state = process_state()
    t0 = time.perf_counter()
    pipe = load(args)
    load_s = time.perf_counter() - t0
    height, width = check_against_model(args, pipe)
    items = plan(prompts, args.n_iter, args.n_samples, args.seed)

    # which files are this job's: its range in the folder's manifest (another job's files are never touched)
    samples = args.outdir / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    remove_leftovers(samples)
    first = claim_range(args.outdir, job_spec(args, prompts, pipe, width, height), len(items))
    path = {it.index: samples / f"{first + it.index:05d}.png" for it in items}
    mine = [it for it in items[state.process_index :: state.num_processes] if not path[it.index].exists()]

    extra = {"Precision": precision_name(pipe.dtype), **({"Eta": f"{args.eta:g}"} if args.eta else {})}
    made, t1 = 0, time.perf_counter()
    bar = tqdm(total=len(mine), disable=args.no_progress or not mine, desc=f"images[{state.process_index}]", unit="img")
    for b in range(0, len(mine), args.n_samples):
        batch = mine[b : b + args.n_samples]
        out = pipe([it.prompt for it in batch], args.negative_prompt, height=height, width=width,
                   num_inference_steps=args.steps, guidance_scale=args.scale, seed=[it.seed for it in batch],
                   sampler=args.sampler, eta=args.eta, progress=False)
        for it, image in zip(batch, out.images):
            params = GenerationParams(it.prompt, args.negative_prompt, args.steps, args.sampler, args.scale, it.seed,
                                      width, height, pipe.name, pipe.model_hash, extra)
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
    n = len(list(outdir.glob("grid-*.png")))
    while True:  # another job may take the same number at the same moment: then the next one
        try:
            return write_png(outdir / f"grid-{n:04d}.png", grid, exclusive=True)
        except FileExistsError:
            n += 1


def main(argv: list[str] | None = None, *, prog: str = "txt2img.py", positional_prompt: bool = False) -> int:
    args = build_parser(prog, positional_prompt).parse_args(None if argv is None else [str(a) for a in argv])
    try:
        prompts = check_args(args)
        return run(args, prompts)
    except (UsageError, ModelError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a file-size limit, a folder that vanished: the path and the cause
        where = e.filename or args.outdir
        print(f"{prog}: error: cannot write {where}: {e.strerror or e}", file=sys.stderr)
        return 1
