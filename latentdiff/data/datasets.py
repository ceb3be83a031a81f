"""Captioned-image readers for the trainer.

Two on-disk conventions are read:
  * diffusers/datasets imagefolder: `metadata.jsonl` lines `{"file_name": ..., "text": ...}`;
  * kohya-style sidecars: `photo.png` captioned by `photo.txt` or `photo.caption` (recursive).
Every problem is reported by scan_captioned_images() as one DataError sentence before training starts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..images import to_rgb

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSIONS = (".txt", ".caption")
_LISTED = 10  # how many offending files an error message names


class DataError(ValueError):
    """The dataset on disk cannot be used; the message says what is wrong and where."""


def _name_some(paths: list, root: Path) -> str:
    names = [str(Path(p).relative_to(root)) for p in paths[:_LISTED]]
    more = f" and {len(paths) - _LISTED} more" if len(paths) > _LISTED else ""
    return ", ".join(names) + more


def _read_metadata(root: Path, allow_missing_captions: bool) -> list[tuple[Path, str]]:
    items, uncaptioned = [], []
    metadata = root / "metadata.jsonl"
    try:
        lines = metadata.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{metadata} is not UTF-8 text (byte {err.start} cannot be decoded); save it as UTF-8.") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{metadata} line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where} is not valid JSON ({err.msg}).") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise DataError(f"{where} must be a JSON object with a string 'file_name'.")
        path = root / row["file_name"]
        if not path.resolve().is_relative_to(root.resolve()):
            raise DataError(f"{where} names {row['file_name']!r}, which is outside the dataset folder {root}; "
                            "file_name must be a path inside it.")
        if not path.is_file():
            raise DataError(f"{where} names {row['file_name']!r}, which does not exist in {root}.")
        text = row.get("text")
        if text is None:
            uncaptioned.append(path)
            text = ""
        elif not isinstance(text, str):
            raise DataError(f"{where} has a 'text' of type {type(text).__name__}; captions must be strings.")
        items.append((path, text))
    if uncaptioned and not allow_missing_captions:
        raise DataError(f"{len(uncaptioned)} image(s) in {metadata} have no 'text' caption: "
                        f"{_name_some(uncaptioned, root)}.")
    return items


def _read_sidecars(root: Path, allow_missing_captions: bool) -> list[tuple[Path, str]]:
    items, uncaptioned = [], []
    images = sorted(p for p in root.rglob("*")
                    if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(root).parts))
    for image in images:
        sidecar = next((image.with_suffix(ext) for ext in CAPTION_EXTENSIONS if image.with_suffix(ext).is_file()), None)
        if sidecar is None:
            uncaptioned.append(image)
            items.append((image, ""))
            continue
        try:
            items.append((image, sidecar.read_text(encoding="utf-8").strip()))
        except UnicodeDecodeError:
            raise DataError(f"caption file {sidecar} is not UTF-8 text.") from None
    if uncaptioned and not allow_missing_captions:
        raise DataError(f"{len(uncaptioned)} image(s) have no .txt/.caption sidecar: {_name_some(uncaptioned, root)} "
                        "(pass allow_missing_captions to train them with an empty caption).")
    return items


def scan_captioned_images(root, *, allow_missing_captions=False) -> list[tuple[Path, str]]:
    """(image path, caption) pairs from `root`: metadata.jsonl if present, else sidecar captions.

    Images not listed in a metadata.jsonl are ignored, as in the imagefolder convention.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist or is not a directory.")
    if (root / "metadata.jsonl").is_file():
        items = _read_metadata(root, allow_missing_captions)
    else:
        items = _read_sidecars(root, allow_missing_captions)
    if not items:
        raise DataError(f"no images found in {root}: expected metadata.jsonl, or "
                        f"{'/'.join(IMAGE_EXTENSIONS)} files with .txt/.caption captions.")
    return items


def augmentation_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one sample's crop and flip.

    Seeded by (seed, epoch, index) alone, so a resumed run, any worker count and any sampling
    order see identical augmentation. The flip is always the first draw, so the latent cache
    (which has no crop to draw) makes the same flip choice.
    """
    return np.random.default_rng([seed, epoch, index])


def place_square(original_size: tuple[int, int], resolution: int, rng: np.random.Generator | None = None):
    """Where the training square lies: ((height, width) of the image resized so its shorter side is `resolution`,
    (top, left) of the square in it), centred, or drawn from `rng` (left, then top)."""
    height, width = original_size
    scale = resolution / min(height, width)
    resized = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
    slack_y, slack_x = resized[0] - resolution, resized[1] - resolution
    if rng is None:
        return resized, (slack_y // 2, slack_x // 2)
    left = int(rng.integers(slack_x + 1))  # left first: the order every earlier run drew them in
    top = int(rng.integers(slack_y + 1))
    return resized, (top, left)


def crop_top_left(resized: tuple[int, int], crop: tuple[int, int], resolution: int, flip: bool) -> tuple[int, int]:
    """SDXL's crops_coords_top_left (Podell et al. 2023, sec. 2.2) for a square `place_square` placed: its (top, left)
    in the resized image, in the mirrored one when flipped (left = width − left − resolution, as kohya's sd-scripts
    count it; diffusers' SDXL scripts flip before cropping, which gives the same)."""
    top, left = crop
    return (top, resized[1] - left - resolution) if flip else (top, left)


def load_image(path, resolution: int, *, flip=False, rng: np.random.Generator | None = None):
    """(pixels (3, resolution, resolution) in [-1, 1], original (height, width), crop_top_left as `crop_top_left`).

    Shorter side resized to `resolution` (LANCZOS), then a center crop, or a random one drawn from
    `rng`. Raises OSError/ValueError for unreadable or truncated files (PIL's
    LOAD_TRUNCATED_IMAGES must stay False for load() to notice truncation).
    """
    with Image.open(path) as image:
        image.load()
        image = to_rgb(image)
    original = (image.height, image.width)
    resized, (top, left) = place_square(original, resolution, rng)
    image = image.resize(resized[::-1], Image.Resampling.LANCZOS)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)
    return pixels.float() / 127.5 - 1.0, original, crop_top_left(resized, (top, left), resolution, flip)


def load_pixels(path, resolution: int, *, flip=False, rng: np.random.Generator | None = None) -> torch.Tensor:
    """The pixels of `load_image`."""
    return load_image(path, resolution, flip=flip, rng=rng)[0]


# What PIL raises for a corrupt, truncated or vanished file.
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class EpochDataset(torch.utils.data.Dataset):
    """(path, caption) items whose per-item randomness is a function of (seed, epoch, index).

    Unreadable items yield None (drop them with collate_skip_none), are logged once and counted in
    `skipped` (distinct files). DataLoader workers hold copies of the dataset, so `skipped` is exact
    only with num_workers=0, and set_epoch() must come before each epoch's iterator is created (not
    compatible with persistent_workers, whose copies never see it).
    """

    def __init__(self, items, seed: int = 0):
        self.items = list(items)
        self.seed = seed
        self.epoch = 0
        self._bad: set[Path] = set()

    @property
    def skipped(self) -> int:
        return len(self._bad)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def _skip(self, path: Path, message: str, err: Exception) -> None:
        if path not in self._bad:
            self._bad.add(path)
            logger.warning("%s %s (%s)", message, path, err)


class CaptionedImageDataset(EpochDataset):
    """Resized, cropped, optionally flipped images with their captions: {"pixel_values", "text", "index"} and the
    sizes SDXL is conditioned on, {"original_size", "crop_top_left"}."""

    def __init__(self, items, resolution: int, *, center_crop=True, random_flip=False, seed=0):
        super().__init__(items, seed)
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __getitem__(self, i: int):
        path, text = self.items[i]
        rng = augmentation_rng(self.seed, self.epoch, i)
        flip = self.random_flip and rng.random() < 0.5
        try:
            pixels, original, crop = load_image(path, self.resolution, flip=flip, rng=None if self.center_crop else rng)
        except UNREADABLE as err:
            self._skip(path, "skipping unreadable image", err)
            return None
        return {"pixel_values": pixels, "text": text, "index": i, **size_conditioning(original, crop)}


def size_conditioning(original: tuple[int, int], crop: tuple[int, int]) -> dict[str, torch.Tensor]:
    """An item's SDXL micro-conditioning: "original_size" (height, width), "crop_top_left" (top, left)."""
    return {"original_size": torch.tensor(original), "crop_top_left": torch.tensor(crop)}


def collate_skip_none(batch):
    """Stack a batch, dropping the None entries of unreadable samples; None if nothing is left."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    collated = {"text": [b["text"] for b in batch], "index": [b["index"] for b in batch]}
    for key in ("pixel_values", "latent_dist", "original_size", "crop_top_left"):
        if key in batch[0]:
            collated[key] = torch.stack([b[key] for b in batch])
    return collated
