"""Validation grids: a few prompts × fixed seeds sampled during training, written as one labelled PNG."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from latentdiff.pngmeta import write_png

MIN_CELL = 128  # small models sample 64 px images: upscale so the grid can be looked at
LABEL_HEIGHT = 16


def labelled_grid(images: list[Image.Image], row_labels: list[str], col_labels: list[str]) -> Image.Image:
    """Rows of images (row-major), each row under its label, seeds along the top."""
    cols = len(col_labels)
    scale = max(1, -(-MIN_CELL // images[0].width))  # ceil division
    w, h = images[0].width * scale, images[0].height * scale
    grid = Image.new("RGB", (cols * w, LABEL_HEIGHT + len(row_labels) * (h + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(col_labels):
        draw.text((c * w + 2, 2), label, fill="black")
    for r, label in enumerate(row_labels):
        top = LABEL_HEIGHT + r * (h + LABEL_HEIGHT)
        draw.text((2, top + 2), label, fill="black")
        for c in range(cols):
            grid.paste(images[r * cols + c].resize((w, h), Image.Resampling.NEAREST), (c * w, top + LABEL_HEIGHT))
    return grid


def validation_grid(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, path: Path) -> Path:
    """Sample every prompt with every seed (one generator per image, so rows never depend on batching)."""
    images = pipe([p for p in prompts for _ in seeds], seed=[s for _ in prompts for s in seeds],
                  num_inference_steps=steps, guidance_scale=guidance, output_type="pil", progress=False).images
    grid = labelled_grid(images, prompts, [f"seed {s}" for s in seeds])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, grid)
    return path
