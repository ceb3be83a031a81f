"""Does the model draw what the prompt says? A pixel-only judge for the shapes dataset.

judge() names an image's background color, foreground color and shape with plain numpy geometry
(no learned model, so the score cannot share a model's blind spots). evaluate() runs every caption
of the shapes grammar through a pipeline and reports accuracies, split into (color, shape) pairs
seen in training and held out of it.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from .data.shapes import (COLORS, CROSS_ARM_RATIO, HOLDOUT, SHAPES, STAR_INNER_RATIO, Prompt,
                          all_prompts, caption, parse_caption, render)
from .pipeline import to_output
from .schedulers import SAMPLERS

# Rotation-invariant features (solidity, fill) of each ideal shape, from its geometry:
# solidity = area / convex-hull area; fill = area / (pi r_max^2), r_max the farthest point from the centroid.
# Star (outer R, inner qR): area 5 q R^2 sin 36deg, hull the pentagon 5/2 R^2 sin 72deg.
# Cross (reach b, arm half-width a = k b): area 8ab - 4a^2, hull the octagon 4b^2 - 2(b - a)^2, r_max^2 = a^2 + b^2.
_q, _k = STAR_INNER_RATIO, CROSS_ARM_RATIO
SHAPE_FEATURES = {
    "circle": (1.0, 1.0),
    "square": (1.0, 2 / math.pi),  # 0.64
    "triangle": (1.0, 3 * math.sqrt(3) / (4 * math.pi)),  # 0.41
    "star": (2 * _q * math.sin(math.radians(36)) / math.sin(math.radians(72)),  # 0.49
             5 * _q * math.sin(math.radians(36)) / math.pi),  # 0.37
    "cross": ((8 * _k - 4 * _k ** 2) / (4 - 2 * (1 - _k) ** 2),  # 0.68
              (8 * _k - 4 * _k ** 2) / (math.pi * (1 + _k ** 2))),  # 0.60
}

MIN_FOREGROUND = 0.005  # fraction of the image: less than this is noise, not a shape


def _nearest(rgb, colors: dict, exclude=None) -> str:
    names = [n for n in colors if n != exclude] or list(colors)
    dist = [np.sum((np.asarray(colors[n], float) - rgb) ** 2) for n in names]
    return names[int(np.argmin(dist))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected region: every pixel repeatedly takes its neighbours' largest label."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        p = np.pad(labels, 1)
        spread = np.maximum.reduce([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        spread = np.where(mask, spread, 0)
        if np.array_equal(spread, labels):
            break
        labels = spread
    ids, counts = np.unique(labels[mask], return_counts=True)
    return labels == ids[np.argmax(counts)]


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull (Andrew's monotone chain + shoelace) of (N, 2) points."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def half(seq):
        chain = []
        for p in seq:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    hull = np.array(half(pts) + half(reversed(pts)), float)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def shape_features(mask: np.ndarray) -> tuple[float, float]:
    """(solidity, fill) of a boolean mask, both rotation invariant; see SHAPE_FEATURES."""
    ys, xs = np.nonzero(mask)
    area = float(len(xs))
    # Pixels are unit squares, so the hull and r_max are over their corners; only each row's
    # outermost pixels can reach the hull (and the farthest point lies on it).
    rows = np.unique(ys)
    left = mask[rows].argmax(1)
    right = mask.shape[1] - 1 - mask[rows, ::-1].argmax(1)
    corners = np.concatenate([np.stack([x + dx, rows + dy], 1)
                              for x, dx in ((left, -0.5), (right, 0.5)) for dy in (-0.5, 0.5)])
    solidity = area / max(_hull_area(corners), 1.0)
    r_max = np.sqrt(((corners - [xs.mean(), ys.mean()]) ** 2).sum(1)).max()
    return solidity, area / (math.pi * r_max ** 2)


def _foreground(rgb: np.ndarray, colors) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(background rgb, shape rgb, shape mask) of a float (H, W, 3) image; the last two None when no shape is drawn.

    Background: median border pixel. Shape color: median of the pixels farthest from the background; the mask
    holds the pixels closer to the shape's color than to the background's.
    """
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb, colors)
    # pixels at least halfway from the background to the nearest other palette color
    others = [np.asarray(c, float) for n, c in colors.items() if n != background]
    gap = min(np.linalg.norm(c - bg_rgb) for c in others) if others else 128.0
    distance = np.linalg.norm(rgb - bg_rgb, axis=-1)
    coarse = distance > gap / 2
    if coarse.mean() < MIN_FOREGROUND:
        return bg_rgb, None, None
    # the shape's color from its core: thin parts (star tips) are mostly edge pixels mixed with the background
    core = coarse & (distance >= np.median(distance[coarse]))
    fg_rgb = np.median(rgb[core], axis=0)
    # anti-aliased edge pixels count when closer to the shape's color: the area stays unbiased
    mask = np.linalg.norm(rgb - fg_rgb, axis=-1) < np.linalg.norm(rgb - bg_rgb, axis=-1)
    return bg_rgb, fg_rgb, mask


def judge(image: np.ndarray, colors=COLORS, shapes=SHAPES) -> dict:
    """{"background", "foreground", "shape"} of an (H, W, 3) uint8 image; None where nothing is found.

    The colors are the palette's nearest to _foreground's; the shape is the largest region of its mask, named by
    its nearest SHAPE_FEATURES entry among `shapes`.
    """
    bg_rgb, fg_rgb, mask = _foreground(np.asarray(image, float)[..., :3], colors)
    background = _nearest(bg_rgb, colors)
    if fg_rgb is None:
        return {"background": background, "foreground": None, "shape": None}
    foreground = _nearest(fg_rgb, colors, exclude=background)
    if not mask.any():
        return {"background": background, "foreground": foreground, "shape": None}
    features = np.array(shape_features(_largest_component(mask)))
    shape = min(shapes, key=lambda s: np.sum((features - SHAPE_FEATURES[s]) ** 2))
    return {"background": background, "foreground": foreground, "shape": shape}


# --- how well a shape is drawn: points, straight sides, stray spots ------------------------------

POINT_PROMINENCE = 0.12  # of the largest radius: a square's corners rise 0.29 above its sides, a circle's noise < 0.05
SIDE_TOLERANCE = 0.04  # a straight side stays within this fraction of its length (+ 1.5 px) of its chord; a side
# bowed in by 7 % of its length measures 0.04-0.05 at 16-28 px radius
SPOT_MIN_PIXELS = 3  # a blob of a third color this large is a stray spot; smaller is noise at the edge


def _radial_profile(mask: np.ndarray, bins: int = 90) -> tuple[np.ndarray, np.ndarray]:
    """(centroid, r) with r[k] the farthest extent of `mask` from its centroid within 4° bins (pixel corners count,
    so a one-pixel shape has a radius), then the max over each bin and its neighbours: a bin that no boundary
    corner falls in would otherwise dip to an interior corner and read as a notch."""
    ys, xs = np.nonzero(mask)
    centre = np.array([xs.mean(), ys.mean()])
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (-0.5, 0.5) for dy in (-0.5, 0.5)])
    d = corners - centre
    k = (np.degrees(np.arctan2(d[:, 1], d[:, 0])) % 360 * bins / 360).astype(int) % bins
    r = np.zeros(bins)
    np.maximum.at(r, k, np.hypot(d[:, 0], d[:, 1]))
    filled = np.nonzero(r)[0]
    r = np.interp(np.arange(bins), filled, r[filled], period=bins)
    return centre, np.maximum.reduce([np.roll(r, -1), r, np.roll(r, 1)])


def _peaks(r: np.ndarray, prominence: float) -> list[int]:
    """Indices of the circular profile's peaks that rise and fall by `prominence` (hysteresis: pixel noise on a
    side or an arc never counts as a corner)."""
    start = int(np.argmin(r))
    order = np.r_[np.arange(start, len(r)), np.arange(start)]
    peaks, valley, top = [], r[start], None
    for i in order:
        if top is None:
            if r[i] - valley >= prominence:
                top = i
            valley = min(valley, r[i])
        elif r[i] > r[top]:
            top = i
        elif r[top] - r[i] >= prominence:
            peaks.append(int(top))
            top, valley = None, r[i]
    if top is not None and r[top] - r[start] >= prominence:
        peaks.append(int(top))
    return sorted(peaks)


def _side_bow(centre: np.ndarray, r: np.ndarray, peaks: list[int]) -> float:
    """Largest inward distance of the outline from the chord between consecutive corners, over that chord's length,
    less a 1.5 px allowance for pixelation: 0 for straight sides, ~0.1 and more for sides curved in."""
    angles = np.radians(np.arange(len(r)) * 360 / len(r))
    points = centre + r[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)
    worst = 0.0
    for a, b in zip(peaks, peaks[1:] + peaks[:1]):
        span = np.arange(a, b if b > a else b + len(r)) % len(r)
        p, q = points[a], points[b]
        side = np.linalg.norm(q - p)
        if side < 1:
            continue
        normal = np.array([p[1] - q[1], q[0] - p[0]]) / side  # points towards the centre for counter-clockwise a→b
        if np.dot(centre - p, normal) < 0:
            normal = -normal
        inward = (points[span] - p) @ normal
        worst = max(worst, (inward.max() - 1.5) / side)
    return worst


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """Every 4-connected region of `mask`, largest first."""
    regions, rest = [], mask.copy()
    while rest.any():
        region = _largest_component(rest)
        regions.append(region)
        rest &= ~region
    return regions


def drawing(image: np.ndarray, colors=COLORS) -> dict:
    """How the image's shape is drawn: {"points": corners of its outline (5 for a star, 3 for a triangle, 0 for a
    circle), "side_bow": see _side_bow, "spots": blobs that are neither shape nor background}.

    A spot is a region of at least SPOT_MIN_PIXELS pixels whose color is far from every mix of the shape's and the
    background's colors (anti-aliased edges are such mixes), or a second patch of the shape's color away from the
    shape. None everywhere when the judge finds no shape.
    """
    rgb = np.asarray(image, float)[..., :3]
    bg_rgb, fg_rgb, mask = _foreground(rgb, colors)
    if fg_rgb is None or not mask.any():
        return {"points": None, "side_bow": None, "spots": None}
    shape = _largest_component(mask)
    centre, r = _radial_profile(shape)
    peaks = _peaks(r, POINT_PROMINENCE * r.max())
    # distance of each pixel from the segment bg → fg in RGB: edge pixels lie on it, a third color does not
    axis = fg_rgb - bg_rgb
    t = np.clip(((rgb - bg_rgb) @ axis) / max(axis @ axis, 1e-9), 0, 1)
    off_axis = np.linalg.norm(rgb - (bg_rgb + t[..., None] * axis), axis=-1)
    third = off_axis > 0.25 * max(np.linalg.norm(axis), 1.0) + 20
    stray = third | (mask & ~shape)
    blobs = [c for c in _components(stray) if c.sum() >= SPOT_MIN_PIXELS]
    return {"points": len(peaks), "side_bow": _side_bow(centre, r, peaks) if len(peaks) >= 3 else None,
            "spots": len(blobs)}


# --- running a pipeline over the grammar --------------------------------------------------------

SWEEP_SAMPLERS = tuple(name for name, spec in SAMPLERS.items() if not spec.stochastic)  # ddim, dpmpp_2m, euler
SWEEP_STEPS = (10, 20, 50)
_FIELDS = {"background": "background", "foreground": "color", "shape": "shape"}  # verdict key -> Prompt field


def image_seed(seed: int, prompt_index: int, k: int) -> int:
    """Seed of image k of prompt `prompt_index` (its place in all_prompts()): independent of
    n_per_prompt, batch size and whether held-out prompts are included."""
    return int(np.random.SeedSequence([seed, prompt_index, k]).generate_state(1)[0])


def _generate(pipe, jobs, *, sampler, steps, guidance_scale, batch_size, progress=False, min_sigma=(None, None)):
    """Images for (Prompt, seed) jobs, batch by batch (each image has its own seed); `min_sigma`: the pipeline's
    (guidance_min_sigma, guidance_min_sigma_all_steps), None for the model's own."""
    for start in tqdm(range(0, len(jobs), batch_size), disable=not progress, desc="eval batches"):
        batch = jobs[start:start + batch_size]
        out = pipe([p.text for p, _ in batch], num_inference_steps=steps, guidance_scale=guidance_scale,
                   seed=[s for _, s in batch], sampler=sampler, output_type="numpy", progress=False,
                   guidance_min_sigma=min_sigma[0], guidance_min_sigma_all_steps=min_sigma[1])
        yield from out.images


# the outline each shape's corners and sides must have: (corners, straight sides)
OUTLINES = {"circle": (0, False), "square": (4, True), "triangle": (3, True), "star": (5, False), "cross": (4, False)}  # points = arms


class VAERoundTrip:
    """Stands in for a pipeline in evaluate(): draws each caption with the dataset's own renderer (from the image's
    seed) and returns it encoded and decoded by `pipe`'s VAE, so the judge scores the VAE alone: what the best
    possible UNet could reach through this decoder."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.defaults = pipe.defaults

    def __call__(self, prompts, *, seed, output_type, **_):
        images = [np.asarray(render(*parse_caption(text), np.random.default_rng(s))) for text, s in zip(prompts, seed)]
        pixels = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        generators = [torch.Generator().manual_seed(s) for s in seed]
        with torch.no_grad():
            decoded = self.pipe.decode(self.pipe.encode(pixels.to(self.pipe.device, self.pipe.vae.dtype), generators))
        return SimpleNamespace(images=to_output(decoded, output_type))


def _correct(prompt: Prompt, verdict: dict, drawn: dict | None = None) -> dict[str, bool]:
    """Which parts of the prompt the image got right; with drawing()'s `drawn`, also "outline" (shape right, with
    its number of corners and, for polygons, straight sides) and "spot_free"."""
    right = {key: verdict[key] == getattr(prompt, attr) for key, attr in _FIELDS.items()}
    right["all"] = all(right.values())
    if drawn is not None:
        corners, straight = OUTLINES[prompt.shape]
        right["outline"] = (right["shape"] and drawn["points"] == corners
                            and (not straight or drawn["side_bow"] <= SIDE_TOLERANCE))
        right["spot_free"] = drawn["spots"] == 0
    return right


def _accuracies(rows: list[dict[str, bool]]) -> dict | None:
    if not rows:
        return None
    return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]} | {"n": len(rows)}


def evaluate(pipe, *, n_per_prompt, sampler, steps, guidance_scale, seed=0, batch_size=32,
             include_holdout=True, shapes=SHAPES, progress=False, min_sigma=(None, None)) -> dict:
    """Accuracy of `pipe` on every shapes caption, n_per_prompt images each (JSON-able dict).

    "all" counts images with background, foreground color and shape all right; "outline" and "spot_free" judge
    the drawing (see _correct); "seen" and "held_out" split by whether the (color, shape) pair was in the training
    set; "by_shape" and "confusion" (prompted shape → judged shape: counts) split by shape. `shapes` picks the
    captions (e.g. ("cross",) after teaching a new shape); the judge always chooses among SHAPES too.
    """
    candidates = tuple(dict.fromkeys((*SHAPES, *shapes)))
    jobs = [(p, image_seed(seed, i, k)) for i, p in enumerate(all_prompts(shapes=shapes))
            if include_holdout or not p.held_out for k in range(n_per_prompt)]
    images = _generate(pipe, jobs, sampler=sampler, steps=steps, guidance_scale=guidance_scale,
                       batch_size=batch_size, progress=progress, min_sigma=min_sigma)
    rows, confusion = [], {shape: {} for shape in shapes}
    ngms = dict(zip(("guidance_min_sigma", "guidance_min_sigma_all_steps"), pipe.defaults.resolve(*min_sigma)))
    for (prompt, _), image in zip(jobs, images):
        verdict = judge(image, shapes=candidates)
        rows.append((prompt, _correct(prompt, verdict, drawing(image))))
        judged = confusion[prompt.shape]
        judged[str(verdict["shape"])] = judged.get(str(verdict["shape"]), 0) + 1
    return {
        "settings": {"sampler": sampler, "steps": steps, "guidance_scale": guidance_scale, **ngms, "seed": seed,
                     "n_per_prompt": n_per_prompt, "include_holdout": include_holdout, "shapes": list(shapes),
                     "holdout": [f"{color} {shape}" for color, shape in HOLDOUT]},
        "overall": _accuracies([r for _, r in rows]),
        "seen": _accuracies([r for p, r in rows if not p.held_out]),
        "held_out": _accuracies([r for p, r in rows if p.held_out]),
        "by_shape": {shape: _accuracies([r for p, r in rows if p.shape == shape]) for shape in shapes},
        "confusion": confusion,
    }


def confusion_table(result: dict) -> str:
    """Markdown: prompted shape (rows) → judged shape (columns), from evaluate()'s "confusion"."""
    judged = list(dict.fromkeys([*SHAPES, *(k for row in result["confusion"].values() for k in row)]))
    lines = ["| prompted \\ judged | " + " | ".join(judged) + " | shape right | outline right | spot-free |",
             "| --- |" + " ---: |" * (len(judged) + 3)]
    for shape, row in result["confusion"].items():
        acc = result["by_shape"][shape]
        lines.append(f"| {shape} | " + " | ".join(str(row.get(j, 0)) for j in judged)
                     + f" | {acc['shape']:.1%} | {acc['outline']:.1%} | {acc['spot_free']:.1%} |")
    return "\n".join(lines)


def sample_grid(pipe, *, sampler, steps, guidance_scale, seed=0, batch_size=32, min_sigma=(None, None)) -> Image.Image:
    """One image per (color, shape) on the next palette color: colors across, shapes down.

    The images are evaluate()'s first sample of each caption; each is labelled with its prompt,
    framed green when the judge finds all three right, red otherwise; held-out pairs are starred.
    """
    by_text = {p.text: (i, p) for i, p in enumerate(all_prompts())}
    names = list(COLORS)
    chosen = [by_text[caption(c, s, names[(j + 1) % len(names)])] for s in SHAPES for j, c in enumerate(names)]
    jobs = [(p, image_seed(seed, i, 0)) for i, p in chosen]
    images = list(_generate(pipe, jobs, sampler=sampler, steps=steps, guidance_scale=guidance_scale,
                            batch_size=batch_size, min_sigma=min_sigma))
    font = ImageFont.load_default()
    scale = max(1, 128 // images[0].shape[1])  # small samples are enlarged (nearest) to be readable
    tile = images[0].shape[1] * scale
    frame, gap, label_h = 3, 2, 30  # a white gap keeps the verdict frame visible on any background
    pad = frame + gap
    cell_w, cell_h = max(tile + 2 * pad + 4, 130), tile + 2 * pad + label_h
    grid = Image.new("RGB", (cell_w * len(names), cell_h * len(SHAPES)), "white")
    draw = ImageDraw.Draw(grid)
    for n, ((prompt, _), image) in enumerate(zip(jobs, images)):
        left, y0 = (n % len(names)) * cell_w, (n // len(names)) * cell_h
        x0 = left + (cell_w - tile) // 2
        ok = _correct(prompt, judge(image))["all"]
        draw.rectangle((x0 - pad, y0, x0 + tile + pad - 1, y0 + tile + 2 * pad - 1),
                       outline=(40, 170, 60) if ok else (210, 40, 40), width=frame)
        grid.paste(Image.fromarray(image).resize((tile, tile), Image.Resampling.NEAREST), (x0, y0 + pad))
        lines = [f"a {prompt.color} {prompt.shape}" + (" *" if prompt.held_out else ""),
                 f"on a {prompt.background} background"]
        for k, line in enumerate(lines):
            width = draw.textlength(line, font=font)
            draw.text((left + (cell_w - width) / 2, y0 + tile + 2 * pad + 2 + 13 * k),
                      line, fill="black", font=font)
    return grid


def sweep_table(results: list[dict]) -> str:
    """Markdown: accuracy by sampler x steps, all-three-correct split into seen and held out."""
    lines = ["| sampler | steps | background | foreground | shape | all (seen) | all (held out) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        s, o = r["settings"], r["overall"]
        held = f"{r['held_out']['all']:.1%}" if r["held_out"] else "-"
        lines.append(f"| {s['sampler']} | {s['steps']} | {o['background']:.1%} | {o['foreground']:.1%} | "
                     f"{o['shape']:.1%} | {r['seen']['all']:.1%} | {held} |")
    return "\n".join(lines)
