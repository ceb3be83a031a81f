#!/usr/bin/env python
"""The README's image-to-image and inpainting figure, made with the shipped model and judged by its pixel judge.

    python scripts/make_img2img_figure.py                 # writes docs/img2img_inpaint.png, prints the verdicts
    python scripts/make_img2img_figure.py --sweep         # also: every caption of the grammar on the same two scenes

Row 1, image-to-image: a rendered red circle on blue, re-imagined as "a yellow star on a blue background" at several
strengths. Row 2, inpainting: a smaller red circle on blue, its bounding box (+4 px) masked and repainted from three
prompts; outside the feathered mask every pixel is the original's (checked here, and counted on the figure).
The shipped model at its defaults (dpmpp_2m, 20 steps, guidance 5, its own NGMS), seed 0; mask blur 1 px, as the default 4 px
(A1111's, for 512-px pictures) would feather most of a 64-px one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from latentdiff import images, load_pipeline
from latentdiff.data.shapes import COLORS, SHAPES, render
from latentdiff.evaluate import judge
from latentdiff.pngmeta import write_png

ROOT = Path(__file__).resolve().parents[1]
BACKGROUND = "blue"
IMG2IMG_INIT = ("red", "circle", 0)  # color, shape, render seed
IMG2IMG_PROMPT = ("yellow", "star")
STRENGTHS = (0.25, 0.5, 0.75, 1.0)
INPAINT_INIT = ("red", "circle", 29)  # a small, centred circle: room to keep around its mask
INPAINT_PROMPTS = (("yellow", "star"), ("white", "triangle"), ("green", "square"))
MASK_MARGIN, MASK_BLUR, SEED = 4, 1.0, 0


def caption(color: str, shape: str) -> str:
    return f"a {color} {shape} on a {BACKGROUND} background"


def scene(color: str, shape: str, seed: int) -> Image.Image:
    return render(color, shape, BACKGROUND, np.random.default_rng(seed))


def box_mask(picture: Image.Image, margin: int) -> np.ndarray:
    """White over the shape's bounding box (pixels far from the background color) plus a margin, black elsewhere."""
    rgb = np.asarray(picture, float)
    ys, xs = np.nonzero(np.linalg.norm(rgb - np.array(COLORS[BACKGROUND]), axis=-1) > 60)
    mask = np.zeros(rgb.shape[:2], np.uint8)
    mask[max(0, ys.min() - margin):ys.max() + margin + 1, max(0, xs.min() - margin):xs.max() + margin + 1] = 255
    return mask


def kept_exactly(mask: np.ndarray) -> np.ndarray:
    """Pixels outside the feathered mask: the pipeline must return them unchanged."""
    return images.feather(torch.from_numpy(mask / 255.0).float()[None, None], MASK_BLUR)[0, 0].numpy() == 0


def verdict_text(v: dict) -> str:
    return f"judge: {v['foreground']} {v['shape']}"


def agrees(v: dict, color: str, shape: str) -> bool:
    return (v["foreground"], v["shape"], v["background"]) == (color, shape, BACKGROUND)


def img2img(pipe, prompts: list[tuple[str, str]], init: Image.Image, strength: float) -> np.ndarray:
    return pipe([caption(*p) for p in prompts], image=init, strength=strength, seed=SEED,
                output_type="numpy", progress=False).images


def inpaint(pipe, prompts: list[tuple[str, str]], init: Image.Image, mask: np.ndarray) -> np.ndarray:
    out = pipe([caption(*p) for p in prompts], image=init, mask_image=mask, mask_blur=MASK_BLUR, seed=SEED,
               output_type="numpy", progress=False).images
    keep = kept_exactly(mask)
    changed = [int((o[keep] != np.asarray(init)[keep]).any(-1).sum()) for o in out]
    if any(changed):
        raise SystemExit(f"inpainting changed pixels outside the feathered mask: {changed}")
    return out


def figure(tiles: list[list[tuple[np.ndarray, list[str], str | None]]], row_titles: list[str]) -> Image.Image:
    """Rows of (image, label lines, frame color or None), enlarged 2x (nearest), labelled like the sample grid."""
    font = ImageFont.load_default()
    scale, frame, gap, label_h, title_w = 2, 3, 2, 44, 110
    tile = 64 * scale
    pad = frame + gap
    cell_w, cell_h = tile + 2 * pad + 16, tile + 2 * pad + label_h
    cols = max(len(row) for row in tiles)
    grid = Image.new("RGB", (title_w + cols * cell_w, cell_h * len(tiles)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (row, title) in enumerate(zip(tiles, row_titles)):
        y0 = r * cell_h
        for k, line in enumerate(title.split("\n")):
            draw.text((8, y0 + tile // 2 - 8 + 13 * k), line, fill="black", font=font)
        for c, (image, lines, color) in enumerate(row):
            left = title_w + c * cell_w
            x0 = left + (cell_w - tile) // 2
            if color is not None:
                draw.rectangle((x0 - pad, y0, x0 + tile + pad - 1, y0 + tile + 2 * pad - 1), outline=color, width=frame)
            grid.paste(Image.fromarray(image).resize((tile, tile), Image.Resampling.NEAREST), (x0, y0 + pad))
            for k, line in enumerate(lines):
                width = draw.textlength(line, font=font)
                draw.text((left + (cell_w - width) / 2, y0 + tile + 2 * pad + 2 + 13 * k), line, fill="black", font=font)
    return grid


GREEN, GRAY = (40, 170, 60), (170, 170, 170)


def make_figure(pipe) -> tuple[Image.Image, list[str]]:
    report = []
    init = scene(*IMG2IMG_INIT)
    row1 = [(np.asarray(init), ["init image", verdict_text(judge(np.asarray(init)))], None)]
    for strength in STRENGTHS:
        out = img2img(pipe, [IMG2IMG_PROMPT], init, strength)[0]
        v = judge(out)
        steps = int(20 * strength)
        row1.append((out, [f"strength {strength:g} ({steps} steps)", verdict_text(v)],
                     GREEN if agrees(v, *IMG2IMG_PROMPT) else GRAY))
        report.append(f"image-to-image, strength {strength:g}: {verdict_text(v)} on {v['background']}")

    init2 = scene(*INPAINT_INIT)
    mask = box_mask(init2, MASK_MARGIN)
    keep = kept_exactly(mask)
    row2 = [(np.asarray(init2), ["init image", verdict_text(judge(np.asarray(init2)))], None),
            (np.repeat(mask[..., None], 3, -1), ["mask (white: repaint)", f"{keep.mean():.0%} kept exactly"], None)]
    outs = inpaint(pipe, list(INPAINT_PROMPTS), init2, mask)
    for (color, shape), out in zip(INPAINT_PROMPTS, outs):
        v = judge(out)
        row2.append((out, [f"a {color} {shape}", verdict_text(v), f"0 of {int(keep.sum())} kept px changed"],
                     GREEN if agrees(v, color, shape) else GRAY))
        report.append(f"inpainting '{caption(color, shape)}': {verdict_text(v)} on {v['background']}; "
                      f"0 of {int(keep.sum())} kept pixels changed")
    prompt_title = f"image-to-image\n'a {IMG2IMG_PROMPT[0]} {IMG2IMG_PROMPT[1]}\n on a {BACKGROUND} background'"
    return figure([row1, row2], [prompt_title, f"inpainting\n(on a {BACKGROUND}\n background)"]), report


def sweep(pipe) -> list[str]:
    """Every other (color, shape) of the grammar on the same background, from the same two scenes."""
    targets = [(c, s) for c in COLORS if c != BACKGROUND for s in SHAPES if (c, s) != IMG2IMG_INIT[:2]]
    lines = [f"{len(targets)} captions 'a {{color}} {{shape}} on a {BACKGROUND} background', seed {SEED}:",
             "| task | strength | judged the prompt (color and shape) | color | shape | still the init's color |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    init = scene(*IMG2IMG_INIT)
    for strength in STRENGTHS:
        out = [o for k in range(0, len(targets), 8) for o in img2img(pipe, targets[k:k + 8], init, strength)]
        lines.append(_row("image-to-image", strength, targets, out))
    init2 = scene(*INPAINT_INIT)
    mask = box_mask(init2, MASK_MARGIN)
    out = [o for k in range(0, len(targets), 8) for o in inpaint(pipe, targets[k:k + 8], init2, mask)]
    lines.append(_row("inpainting (pixels outside the feathered mask: all unchanged)", 1.0, targets, out))
    return lines


def _row(task: str, strength: float, targets, outs) -> str:
    verdicts = [judge(o) for o in outs]
    both = np.mean([agrees(v, c, s) for v, (c, s) in zip(verdicts, targets)])
    color = np.mean([v["foreground"] == c for v, (c, _) in zip(verdicts, targets)])
    shape = np.mean([v["shape"] == s for v, (_, s) in zip(verdicts, targets)])
    source = np.mean([v["foreground"] == IMG2IMG_INIT[0] for v, (c, _) in zip(verdicts, targets) if c != IMG2IMG_INIT[0]])
    return f"| {task} | {strength:g} | {both:.0%} | {color:.0%} | {shape:.0%} | {source:.0%} |"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img2img_inpaint.png")
    p.add_argument("--sweep", action="store_true", help="also judge every caption of the grammar on both scenes")
    p.add_argument("--precision", default="auto")
    args = p.parse_args(argv)
    pipe = load_pipeline(precision=args.precision)
    image, report = make_figure(pipe)
    write_png(args.out, image)
    print("\n".join([f"wrote {args.out} ({args.precision} -> {pipe.dtype})", *report]))
    if args.sweep:
        print("\n".join(sweep(pipe)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
