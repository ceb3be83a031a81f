"""Batch text-to-image: the job behind `scripts/txt2img.py` and `latentdiff generate`.

Image k of a job (prompts × n_iter × n_samples, in that order) gets seed `base seed + k` and the file
`OUTDIR/samples/{k:05d}.png`, so a rerun after a kill skips finished images and makes exactly the missing
ones, and `accelerate launch --num_processes N` splits the images round-robin with none made twice.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .pngmeta import GenerationParams, atomic_write_bytes, read_params, save_png
from .precision import PRECISIONS, precision_name, process_state

SAMPLER_NAMES = ("ddim", "ddpm", "dpmpp_2m", "euler", "euler_ancestral")  # checked against the registry in tests
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DEFAULTS = dict(steps=20, scale=7.5, sampler="dpmpp_2m")


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
    p.add_argument("--negative-prompt", default="", help="what the image should not show")
    p.add_argument("--model", help="diffusers-format folder or SD 1.x/2.x .safetensors/.ckpt (default: the shipped model)")
    p.add_argument("--outdir", type=Path, default=Path("outputs/txt2img"), help="writes OUTDIR/samples/NNNNN.png and a grid")
    p.add_argument("--n-samples", type=int, default=1, help="batch size: images generated together")
    p.add_argument("--n-iter", type=int, default=1, help="how many batches per prompt")
    p.add_argument("--steps", type=int, default=None, help=f"sampling steps (default {DEFAULTS['steps']})")
    p.add_argument("--scale", type=float, default=None, help=f"classifier-free guidance scale (default {DEFAULTS['scale']})")
    p.add_argument("--sampler", default=None, help=f"one of {', '.join(SAMPLER_NAMES)} (default {DEFAULTS['sampler']})")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--seed", type=int, default=42, help="seed of the first image; image k uses seed + k")
    p.add_argument("--H", type=int, default=None, help="image height in pixels (default: the model's native size)")
    p.add_argument("--W", type=int, default=None, help="image width in pixels (default: the model's native size)")
    p.add_argument("--precision", default="auto", help=f"one of {', '.join(PRECISIONS)}")
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
        except (OSError, ValueError) as e:  # not an image, no `parameters` chunk, or text that does not parse
            reason = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
            raise UsageError(f"cannot replay --from-png {args.from_png}: {reason}") from None
        args.prompt, args.negative_prompt, args.seed = params.prompt, params.negative_prompt, params.seed
        args.steps, args.scale, args.sampler = params.steps, params.cfg_scale, params.sampler
        args.W, args.H = params.width, params.height
        args.precision = params.extra.get("Precision", args.precision)
        args.eta = eta
        args.n_samples = args.n_iter = 1
    args.steps = DEFAULTS["steps"] if args.steps is None else args.steps
    args.scale = DEFAULTS["scale"] if args.scale is None else args.scale
    args.sampler = args.sampler or DEFAULTS["sampler"]
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
    if args.sampler not in SAMPLER_NAMES:
        raise UsageError(f"unknown sampler {args.sampler!r}; expected one of: {', '.join(SAMPLER_NAMES)}")
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
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {args.outdir} is not writable")
    return prompts


def plan(prompts: list[str], n_iter: int, n_samples: int, seed: int) -> list[Item]:
    per_prompt = n_iter * n_samples
    return [Item(k, prompts[k // per_prompt], seed + k) for k in range(len(prompts) * per_prompt)]


def run(args, prompts: list[str]) -> int:
    from tqdm.auto import tqdm

    from .pipeline import ModelError, load_pipeline

    state = process_state()
    samples = args.outdir / "samples"
    items = plan(prompts, args.n_iter, args.n_samples, args.seed)
    if args.from_png is not None:  # a replay is one more image, after whatever the folder already holds
        first = len(list(samples.glob("*.png"))) if samples.is_dir() else 0
        items = [Item(first, prompts[0], args.seed)]
    mine = [it for it in items[state.process_index :: state.num_processes] if not (samples / f"{it.index:05d}.png").exists()]

    t0 = time.perf_counter()
    try:
        pipe = load_pipeline(args.model, device=state.device, precision=args.precision)
    except ModelError:
        raise
    except Exception as e:  # a corrupt or foreign file: say which, in one sentence
        first_line = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
        raise ModelError(f"cannot load model {args.model or 'default'}: {first_line}") from e
    load_s = time.perf_counter() - t0
    precision = args.precision if args.precision != "auto" else precision_name(pipe.dtype)
    size = pipe.unet.config.sample_size * pipe.vae_scale
    width, height = args.W or size, args.H or size

    samples.mkdir(parents=True, exist_ok=True)
    t1 = time.perf_counter()
    bar = tqdm(total=len(mine), disable=args.no_progress or not mine, desc=f"images[{state.process_index}]", unit="img")
    for b in range(0, len(mine), args.n_samples):
        batch = mine[b : b + args.n_samples]
        out = pipe([it.prompt for it in batch], args.negative_prompt, height=height, width=width,
                   num_inference_steps=args.steps, guidance_scale=args.scale, seed=[it.seed for it in batch],
                   sampler=args.sampler, eta=args.eta, progress=False)
        for it, image in zip(batch, out.images):
            extra = {"Precision": precision, **({"Eta": f"{args.eta:g}"} if args.eta else {})}
            params = GenerationParams(it.prompt, args.negative_prompt, args.steps, args.sampler, args.scale, it.seed,
                                      width, height, pipe.name, pipe.model_hash, extra)
            save_png(samples / f"{it.index:05d}.png", image, params)
        bar.update(len(batch))
    bar.close()
    gen_s = time.perf_counter() - t1

    state.wait_for_everyone()
    if state.is_main_process and mine and not args.skip_grid:
        _write_grid(args.outdir, [samples / f"{it.index:05d}.png" for it in items], args.n_samples)
    n = len(mine)
    rate = f" ({gen_s / n:.2f} s/image)" if n else ""
    print(f"{n} images in {gen_s:.1f} s{rate}; model loaded in {load_s:.1f} s; output in {samples}"
          + (f" [process {state.process_index} of {state.num_processes}]" if state.num_processes > 1 else ""), file=sys.stderr)
    return 0


def _write_grid(outdir: Path, files: list[Path], n_cols: int) -> None:
    """One more grid file (grid-NNNN.png) of every finished image; earlier grids are kept, never overwritten."""
    import io

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
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    atomic_write_bytes(outdir / f"grid-{n:04d}.png", buf.getvalue())


def main(argv: list[str] | None = None, *, prog: str = "txt2img.py", positional_prompt: bool = False) -> int:
    from .pipeline import ModelError

    args = build_parser(prog, positional_prompt).parse_args(None if argv is None else [str(a) for a in argv])
    try:
        prompts = check_args(args)
        return run(args, prompts)
    except (UsageError, ModelError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
