"""Encode every training image once with the VAE and keep the posterior on disk.

An entry is a safetensors file holding the posterior parameters (mean and log-variance stacked on
the channel axis, as diffusers' DiagonalGaussianDistribution stores them), so training can still
sample the posterior instead of always using its mean (latentdiff.vae.to_latents), and the image's
original size, which SDXL is conditioned on. The file name is the sha256 of everything
that shapes the result: the image bytes, the VAE (weights and config), the resolution, the crop
and flip modes. A changed image or VAE therefore misses, and stale files are simply never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from ..files import atomic_write_bytes
from ..vae import posterior
from .datasets import (UNREADABLE, EpochDataset, augmentation_rng, crop_top_left, load_image, place_square,
                       size_conditioning)

logger = logging.getLogger(__name__)

ENTRY_LAYOUT = 2  # 2: entries hold "original_size"; the names of layout-1 entries differ, so they are never read


def vae_fingerprint(vae) -> str:
    """sha256 of the VAE's config and every tensor of its state dict (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class LatentCache:
    """Posterior parameters of each image in `cache_dir`, for one VAE and one preprocessing.

    Only center crops can be cached: a random crop differs every epoch. With random_flip both the
    plain and the mirrored image are encoded, and CachedLatentDataset picks one per (seed, epoch, index).
    """

    def __init__(self, cache_dir, vae, resolution: int, center_crop: bool = True, random_flip: bool = False):
        if not center_crop:
            raise ValueError("latent caching needs center_crop=True: a random crop differs every epoch.")
        self.cache_dir = Path(cache_dir)
        self.vae = vae
        self.resolution = resolution
        self.random_flip = random_flip
        self._settings = f"{vae_fingerprint(vae)}|res={resolution}|crop=center|flip={random_flip}|entry={ENTRY_LAYOUT}"
        self._keys: dict[Path, str] = {}

    def path_for(self, image_path) -> Path:
        """The entry's file. Image bytes are hashed once per path: an image edited while this
        object lives goes unnoticed until the next LatentCache (the next run)."""
        image_path = Path(image_path)
        if image_path not in self._keys:
            digest = hashlib.sha256(self._settings.encode())
            digest.update(image_path.read_bytes())
            self._keys[image_path] = digest.hexdigest()
        return self.cache_dir / f"{self._keys[image_path]}.safetensors"

    def load(self, image_path, flip: bool = False) -> torch.Tensor:
        """The posterior parameters (2C, h, w) of the image, or of its mirror image."""
        return self.entry(image_path)["flipped" if flip else "params"]

    def entry(self, image_path) -> dict[str, torch.Tensor]:
        """Everything stored for the image: "params", "flipped" (with random_flip), "original_size" (height, width)."""
        return load_file(self.path_for(image_path))

    def _missing(self, items) -> list[Path]:
        missing = []
        for path, _ in items:
            try:
                if not self.path_for(path).is_file():
                    missing.append(Path(path))
            except OSError as err:
                logger.warning("cannot read %s for the latent cache (%s)", path, err)
        return list(dict.fromkeys(missing))  # the same file listed twice is encoded once

    @torch.no_grad()
    def build(self, items, batch_size: int, progress: bool = True) -> int:
        """Encode the images of `items` without an entry, on the VAE's device; returns how many were encoded.

        Entries are stored in float32.
        Unreadable images are logged and left without an entry (CachedLatentDataset skips them).
        """
        missing = self._missing(items)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        encoded = 0
        for start in tqdm(range(0, len(missing), batch_size), disable=not progress, desc="caching latents"):
            paths, pixels, originals = [], [], []
            for path in missing[start:start + batch_size]:
                try:
                    x, original, _ = load_image(path, self.resolution)
                    paths.append(path)
                    pixels.append(x)
                    originals.append(original)
                except UNREADABLE as err:
                    logger.warning("skipping unreadable image %s (%s)", path, err)
            if not paths:
                continue
            x = torch.stack(pixels)  # (B, 3, H, W)
            if self.random_flip:
                x = torch.cat([x, x.flip(-1)])
            params = posterior(self.vae, x).cpu()  # (B or 2B, 2C, h, w)
            for i, path in enumerate(paths):
                tensors = {"params": params[i].contiguous(), "original_size": torch.tensor(originals[i])}
                if self.random_flip:
                    tensors["flipped"] = params[len(paths) + i].contiguous()
                atomic_write_bytes(self.path_for(path), save(tensors))
                encoded += 1
        return encoded


class CachedLatentDataset(EpochDataset):
    """CaptionedImageDataset's twin over cached posteriors: {"latent_dist", "text", "index", "original_size",
    "crop_top_left"}.

    The flip is drawn exactly as the image dataset draws it, so switching caching on does not change
    which samples are mirrored. Images without an entry yield None and are counted in `skipped`.
    """

    def __init__(self, cache: LatentCache, items, seed: int = 0):
        super().__init__(items, seed)
        self.cache = cache

    def __getitem__(self, i: int):
        path, text = self.items[i]
        flip = self.cache.random_flip and augmentation_rng(self.seed, self.epoch, i).random() < 0.5
        try:
            entry = self.cache.entry(path)
            params, original = entry["flipped" if flip else "params"], tuple(entry["original_size"].tolist())
        except (OSError, KeyError, SafetensorError) as err:
            self._skip(path, "no cached latents for", err)
            return None
        resized, crop = place_square(original, self.cache.resolution)  # the centred square the entry was encoded from
        crop = crop_top_left(resized, crop, self.cache.resolution, flip)
        return {"latent_dist": params, "text": text, "index": i, **size_conditioning(original, crop)}
