"""`latentdiff eval-shapes`: judge a model on every caption of the shapes grammar (latentdiff.evaluate)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import DEFAULTS
from ..data.shapes import SHAPE_DRAWERS, SHAPES
from ..errors import ModelError
from ..evaluate import (SWEEP_SAMPLERS, SWEEP_STEPS, VAERoundTrip, confusion_table, evaluate, sample_grid,
                        sweep_table)
from ..files import atomic_write_text
from ..model_defaults import check_min_sigma
from ..pipeline import load_pipeline
from ..pngmeta import write_png
from ..precision import PRECISIONS
from ..schedulers import SAMPLERS


def _check_output(parser, path: str | None) -> None:
    if path is not None and (Path(path).is_dir() or not Path(path).resolve().parent.is_dir()):
        parser.error(f"cannot write {path}: expected a file name in an existing folder.")


def main(argv: list[str]) -> int:
    """`latentdiff eval-shapes`: judge a model on every shapes caption; print (and save) the JSON."""
    parser = argparse.ArgumentParser(prog="latentdiff eval-shapes", description=main.__doc__)
    parser.add_argument("--model", help="model folder or file (default: the shipped model)")
    parser.add_argument("--n-per-prompt", type=int, required=True, help="images per caption (224 captions)")
    parser.add_argument("--sampler", default=DEFAULTS.sampler)
    parser.add_argument("--steps", type=int, default=DEFAULTS.steps)
    parser.add_argument("--scale", type=float, default=DEFAULTS.guidance_scale, help="classifier-free guidance scale")
    parser.add_argument("--guidance-min-sigma", type=float, default=None, metavar="SIGMA",
                        help="NGMS: skip the unconditional pass below this σ (default: the model's own)")
    parser.add_argument("--guidance-min-sigma-all-steps", action=argparse.BooleanOptionalAction, default=None,
                        help="on every step below it, not every other one (default: the model's own)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated shapes whose captions to judge")
    parser.add_argument("--lora", help="a LoRA file to apply (pytorch_lora_weights.safetensors)")
    parser.add_argument("--lora-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-holdout", action="store_true", help="skip the held-out (color, shape) captions")
    parser.add_argument("--device", default=None, help="torch device (default: the pipeline's choice)")
    parser.add_argument("--precision", default=DEFAULTS.precision, help=f"one of {', '.join(PRECISIONS)}")
    parser.add_argument("--out", help="write the JSON here")
    parser.add_argument("--grid", help="write a labelled sample grid PNG here")
    parser.add_argument("--vae-only", action="store_true",
                        help="judge the VAE alone: each caption drawn by the dataset's renderer, encoded and decoded")
    parser.add_argument("--sweep", action="store_true",
                        help=f"samplers {','.join(SWEEP_SAMPLERS)} x steps {','.join(map(str, SWEEP_STEPS))}: "
                             "print a markdown table")
    args = parser.parse_args(argv)
    for name, value in (("--n-per-prompt", args.n_per_prompt), ("--steps", args.steps),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            parser.error(f"{name} must be at least 1, got {value}.")
    if args.sampler not in SAMPLERS:
        parser.error(f"unknown sampler {args.sampler!r}; expected one of: {', '.join(SAMPLERS)}.")
    if args.precision not in PRECISIONS:
        parser.error(f"unknown precision {args.precision!r}; expected one of: {', '.join(PRECISIONS)}.")
    if args.model is not None and not Path(args.model).exists():
        parser.error(f"model path {args.model} does not exist.")
    if args.lora is not None and not Path(args.lora).is_file():
        parser.error(f"LoRA file {args.lora} does not exist.")
    try:
        check_min_sigma(args.guidance_min_sigma or 0.0, bool(args.guidance_min_sigma_all_steps))
    except ValueError as e:
        parser.error(f"--{e}.".replace("_", "-", 2))
    if args.vae_only and args.sweep:
        parser.error("--vae-only judges the VAE alone: it has no sampler or steps to --sweep.")
    shapes = tuple(s.strip() for s in args.shapes.split(",") if s.strip())
    unknown = [s for s in shapes if s not in SHAPE_DRAWERS]
    if not shapes or unknown:
        parser.error(f"unknown shape(s) {unknown or args.shapes!r}; expected some of: {', '.join(SHAPE_DRAWERS)}.")
    _check_output(parser, args.out)
    _check_output(parser, args.grid)

    try:
        pipe = load_pipeline(args.model, device=args.device, precision=args.precision)
    except ModelError as err:
        print(f"latentdiff eval-shapes: error: {err}", file=sys.stderr)
        return 2
    if args.lora:
        pipe.load_lora(args.lora, scale=args.lora_scale)
    if args.vae_only:
        pipe = VAERoundTrip(pipe)
    min_sigma = (args.guidance_min_sigma, args.guidance_min_sigma_all_steps)
    common = dict(n_per_prompt=args.n_per_prompt, guidance_scale=args.scale, seed=args.seed, shapes=shapes,
                  batch_size=args.batch_size, include_holdout=not args.no_holdout, progress=True, min_sigma=min_sigma)
    if args.sweep:
        result = [evaluate(pipe, sampler=sampler, steps=steps, **common)
                  for sampler in SWEEP_SAMPLERS for steps in SWEEP_STEPS]
        print(sweep_table(result))
    else:
        result = evaluate(pipe, sampler=args.sampler, steps=args.steps, **common)
        print(json.dumps(result, indent=2))
        print(confusion_table(result), file=sys.stderr)  # stdout stays one JSON document
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    if args.grid:
        write_png(args.grid, sample_grid(pipe, sampler=args.sampler, steps=args.steps, guidance_scale=args.scale,
                                         seed=args.seed, batch_size=args.batch_size, min_sigma=min_sigma))
    return 0
