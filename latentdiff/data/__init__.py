"""Dataset readers, the latent cache and the synthetic shapes set."""

from .datasets import (CaptionedImageDataset, DataError, augmentation_rng, collate_skip_none, load_pixels,
                       scan_captioned_images)
from .latent_cache import CachedLatentDataset, LatentCache, vae_fingerprint
from .shapes import COLORS, HOLDOUT, SHAPE_DRAWERS, SHAPES, Prompt, all_prompts, caption, make_shapes

__all__ = [
    "CaptionedImageDataset", "DataError", "augmentation_rng", "collate_skip_none", "load_pixels",
    "scan_captioned_images",
    "CachedLatentDataset", "LatentCache", "vae_fingerprint",
    "COLORS", "HOLDOUT", "SHAPE_DRAWERS", "SHAPES", "Prompt", "all_prompts", "caption", "make_shapes",
]
