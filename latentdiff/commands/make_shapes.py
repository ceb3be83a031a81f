"""`latentdiff make-shapes OUTDIR --n N`: write the synthetic captioned shapes dataset."""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Callable

from ..data.shapes import (COLORS, HOLDOUT, SHAPE_DRAWERS, SHAPES, SIZE_RANGE, allowed_pairs, check_args,
                           make_shapes)


def _parse_colors(spec: str) -> dict[str, tuple[int, int, int]]:
    """`red,green,pink=#ff69b4`: palette names, or new names with a hex RGB value."""
    colors = {}
    for item in filter(None, spec.split(",")):
        name, _, hex_value = item.partition("=")
        if hex_value:
            if not re.fullmatch(r"#?[0-9a-fA-F]{6}", hex_value):
                raise ValueError(f"color {item!r} must look like name=#rrggbb.")
            value = hex_value.lstrip("#")
            colors[name] = tuple(int(value[k:k + 2], 16) for k in (0, 2, 4))
        elif name in COLORS:
            colors[name] = COLORS[name]
        else:
            raise ValueError(f"unknown color {name!r}; known: {', '.join(COLORS)} (or give name=#rrggbb).")
    return colors


def _parse_per_shape(spec: str, what: str, form: str, parse: Callable[[str], Any]) -> dict[str, Any]:
    """`triangle=2,square=1.5` → {"triangle": parse("2"), "square": parse("1.5")}."""
    values = {}
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        try:
            values[name] = parse(value)
        except ValueError:
            raise ValueError(f"shape {what} {item!r} must look like {form}.") from None
    return values


def _parse_range(value: str) -> tuple[float, float]:
    low, sep, high = value.partition(":")
    if not sep:
        raise ValueError(value)
    return float(low), float(high)


def main(argv: list[str]) -> int:
    """`latentdiff make-shapes OUTDIR --n N ...`; bad arguments exit 2 before anything is written."""
    parser = argparse.ArgumentParser(prog="latentdiff make-shapes", description=make_shapes.__doc__.splitlines()[0])
    parser.add_argument("outdir")
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--colors", default=",".join(COLORS), help="comma list; new ones as name=#rrggbb")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list from {', '.join(SHAPE_DRAWERS)}")
    parser.add_argument("--include-holdout", action="store_true", help="also draw the held-out (color, shape) pairs")
    parser.add_argument("--shape-weights", default="",
                        help="comma list shape=weight (default 1 each): e.g. triangle=2 draws twice as many triangles")
    parser.add_argument("--shape-sizes", default="",
                        help="comma list shape=low:high, the circumradius as a fraction of the side (default "
                             f"{SIZE_RANGE[0]}:{SIZE_RANGE[1]} each): e.g. star=0.33:0.40")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering images (same files for any number)")
    args = parser.parse_args(argv)
    try:
        colors = _parse_colors(args.colors)
        shapes = tuple(filter(None, args.shapes.split(",")))
        weights = _parse_per_shape(args.shape_weights, "weight", "shape=number", float)
        sizes = _parse_per_shape(args.shape_sizes, "size", "shape=low:high", _parse_range)
        check_args(args.n, args.size, colors, shapes,
                   allowed_pairs(colors, shapes, HOLDOUT, args.include_holdout), weights, sizes)
    except ValueError as err:
        parser.error(str(err))  # exits 2
    if Path(args.outdir).exists() and not Path(args.outdir).is_dir():
        parser.error(f"{args.outdir} exists and is not a directory.")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}.")
    written = make_shapes(args.outdir, args.n, args.seed, size=args.size, colors=colors, shapes=shapes,
                          include_holdout=args.include_holdout, shape_weights=weights,
                          shape_sizes=sizes, workers=args.workers)
    print(f"wrote {written} images and metadata.jsonl to {args.outdir}")
    return 0
