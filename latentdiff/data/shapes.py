"""The synthetic "shapes" dataset: one filled shape on a plain background, captioned
`a {color} {shape} on a {background} background`.

Small enough to train a text-to-image model on a CPU in minutes, and judged by pixels alone
(latentdiff.evaluate), so "does the model follow the prompt?" becomes a number. A few
(color, shape) pairs are held out of training to measure compositional generalisation.
"""

from __future__ import annotations

import functools
import io
import json
import math
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from ..files import atomic_write_bytes

# Saturated and far apart in RGB, so the pixel judge can name a color after VAE round trips.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 170, 40),
    "blue": (30, 60, 230),
    "yellow": (250, 220, 20),
    "purple": (140, 40, 180),
    "orange": (255, 140, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES = ("circle", "square", "triangle", "star")
# Never generated for training unless asked: does the model compose "red" and "star"?
HOLDOUT = (("red", "star"), ("blue", "triangle"), ("yellow", "square"), ("purple", "circle"))

SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges like a real photo's
SIZE_RANGE = (0.30, 0.45)  # circumradius as a fraction of the side, drawn uniformly
STAR_INNER_RATIO = 0.4  # inner/outer radius: clearly non-convex (solidity ~0.49)
CROSS_ARM_RATIO = 0.3  # arm half-width / arm reach of the plus sign (solidity ~0.68)


def _regular_polygon(n: int, r: float, angle: float) -> list[tuple[float, float]]:
    return [(r * math.cos(angle + 2 * math.pi * k / n), r * math.sin(angle + 2 * math.pi * k / n)) for k in range(n)]


def _star(r: float, angle: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):  # alternate outer and inner vertices of a 5-pointed star
        radius = r if k % 2 == 0 else r * STAR_INNER_RATIO
        a = angle + math.pi * k / 5
        points.append((radius * math.cos(a), radius * math.sin(a)))
    return points


def _cross(r: float, angle: float) -> list[tuple[float, float]]:
    # Plus sign whose arm corners lie on the circumcircle: reach b, half-width a, a² + b² = r².
    b = r / math.hypot(1.0, CROSS_ARM_RATIO)
    a = b * CROSS_ARM_RATIO
    quarter = [(b, -a), (b, a), (a, a)]  # one arm's outer edge and the inner corner after it
    points = []
    for k in range(4):
        c, s = math.cos(math.pi / 2 * k), math.sin(math.pi / 2 * k)
        points += [(x * c - y * s, x * s + y * c) for x, y in quarter]
    return [(x * math.cos(angle) - y * math.sin(angle), x * math.sin(angle) + y * math.cos(angle)) for x, y in points]


# name -> vertices (centred at the origin) for circumradius r and rotation angle; None = a disc.
SHAPE_DRAWERS: dict[str, Callable[[float, float], list[tuple[float, float]] | None]] = {
    "circle": lambda r, angle: None,
    "square": lambda r, angle: _regular_polygon(4, r, angle),
    "triangle": lambda r, angle: _regular_polygon(3, r, angle),
    "star": _star,
    "cross": _cross,  # not in SHAPES: the "teach it a new shape" fine-tuning demo
}


class Prompt(NamedTuple):
    text: str
    color: str
    shape: str
    background: str
    held_out: bool


def caption(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


_CAPTION = re.compile(r"a (\S+) (\S+) on a (\S+) background")


def parse_caption(text: str) -> tuple[str, str, str]:
    """(color, shape, background) of a shapes caption; ValueError if `text` is off-grammar."""
    match = _CAPTION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"caption {text!r} does not match 'a {{color}} {{shape}} on a {{background}} background'.")
    return match.group(1), match.group(2), match.group(3)


def all_prompts(include_holdout: bool = True, *, colors=COLORS, shapes=SHAPES, holdout=HOLDOUT) -> list[Prompt]:
    """Every caption of the grammar (8 colors x 4 shapes x 7 backgrounds = 224 by default)."""
    held = set(map(tuple, holdout))
    prompts = []
    for color in colors:
        for shape in shapes:
            for background in colors:
                if background == color:
                    continue
                is_held = (color, shape) in held
                if include_holdout or not is_held:
                    prompts.append(Prompt(caption(color, shape, background), color, shape, background, is_held))
    return prompts


def render(color, shape, background, rng: np.random.Generator, *, size=64, colors=COLORS,
           size_range=SIZE_RANGE) -> Image.Image:
    """One image: random circumradius (a fraction of the side in `size_range`), position (fully inside), rotation."""
    big = size * SUPERSAMPLE
    r = rng.uniform(*size_range) * big
    cx, cy = rng.uniform(r, big - r, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    image = Image.new("RGB", (big, big), colors[background])
    draw = ImageDraw.Draw(image)
    vertices = SHAPE_DRAWERS[shape](r, angle)
    if vertices is None:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colors[color])
    else:
        draw.polygon([(cx + x, cy + y) for x, y in vertices], fill=colors[color])
    return image.resize((size, size), Image.Resampling.LANCZOS)


def allowed_pairs(colors, shapes, holdout, include_holdout) -> list[tuple[str, str]]:
    held = set(map(tuple, holdout))
    return [(c, s) for c in colors for s in shapes if include_holdout or (c, s) not in held]


def check_args(n, size, colors, shapes, pairs, shape_weights=None, shape_sizes=None) -> None:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}.")
    if len(colors) < 2:
        raise ValueError("at least two colors are needed: the shape and its background must differ.")
    unknown = [s for s in shapes if s not in SHAPE_DRAWERS]
    if unknown:
        raise ValueError(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPE_DRAWERS)}.")
    if not pairs:
        raise ValueError("every (color, shape) pair is held out: nothing to generate.")
    for shape, weight in (shape_weights or {}).items():
        if shape not in shapes:
            raise ValueError(f"a weight is given for {shape!r}, which is not among the shapes {', '.join(shapes)}.")
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"the weight of {shape!r} must be a positive number, got {weight}.")
    for shape, (low, high) in (shape_sizes or {}).items():
        if shape not in shapes:
            raise ValueError(f"a size is given for {shape!r}, which is not among the shapes {', '.join(shapes)}.")
        if not 0 < low <= high <= 0.5:  # beyond half the side the shape cannot fit inside the image
            raise ValueError(f"the size of {shape!r} must satisfy 0 < low <= high <= 0.5 (fractions of the side), "
                             f"got {low}:{high}.")


def make_shapes(outdir, n: int, seed: int = 0, *, size=64, colors=COLORS, shapes=SHAPES,
                holdout=HOLDOUT, include_holdout=False, shape_weights: dict[str, float] | None = None,
                shape_sizes: dict[str, tuple[float, float]] | None = None, workers: int = 1) -> int:
    """Write `n` images + metadata.jsonl (diffusers imagefolder layout) to `outdir`; returns n.

    (color, shape) pairs are drawn uniformly, or in proportion to `shape_weights` (default 1 per shape): more of
    the shapes a model finds hard. A shape's circumradius is drawn from `shape_sizes[shape]` (fractions of the side;
    default SIZE_RANGE): keep a shape to the sizes at which a small model resolves it. Image i depends only on (seed, i), so a rerun rewrites identical bytes and
    `workers` processes write the same files as one.
    metadata.jsonl is removed first and written last: a folder without it is an unfinished run.
    """
    pairs = allowed_pairs(colors, shapes, holdout, include_holdout)
    check_args(n, size, colors, shapes, pairs, shape_weights, shape_sizes)
    p = None
    if shape_weights:
        weights = np.array([shape_weights.get(shape, 1.0) for _, shape in pairs])
        p = weights / weights.sum()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "metadata.jsonl").unlink(missing_ok=True)
    write = functools.partial(_write_image, outdir, seed, pairs, p, size, colors, shape_sizes or {})
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            lines = list(pool.map(write, range(n), chunksize=256))
    else:
        lines = [write(i) for i in range(n)]
    atomic_write_bytes(outdir / "metadata.jsonl", "".join(lines).encode())
    return n


def _write_image(outdir: Path, seed: int, pairs, p, size: int, colors, shape_sizes, i: int) -> str:
    """Render and write image i; returns its metadata.jsonl line."""
    rng = np.random.default_rng([seed, i])
    color, shape = pairs[rng.integers(len(pairs)) if p is None else rng.choice(len(pairs), p=p)]
    backgrounds = [b for b in colors if b != color]
    background = backgrounds[rng.integers(len(backgrounds))]
    image = render(color, shape, background, rng, size=size, colors=colors,
                   size_range=shape_sizes.get(shape, SIZE_RANGE))
    name = f"{i:05d}.png"
    png = io.BytesIO()
    image.save(png, format="PNG")
    atomic_write_bytes(outdir / name, png.getvalue())
    return json.dumps({"file_name": name, "text": caption(color, shape, background)}) + "\n"
