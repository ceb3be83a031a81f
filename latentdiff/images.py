"""Pictures handed to the pipeline for image-to-image and inpainting: inputs → tensors, masks, feathering, paste-back.

An image is a PIL image, a uint8 array (H, W, 3) or (B, H, W, 3), or a float tensor (3, H, W) or (B, 3, H, W) in
[0, 1] (what `output_type="pt"` returns), or a list of these. A mask is the same with one channel (a PIL image of
any mode, a uint8 (H, W) array, a float (1, H, W) or (H, W) tensor): white (1) where the model repaints, black (0)
where the picture is kept. Everything becomes float32 on the CPU in [0, 1]; images that are not RGB are converted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SIZE_MULTIPLE = 8  # image sides in pixels: SD's VAE downsamples by 8


@dataclass
class InitImages:
    """What image-to-image and inpainting start from, one row per generated image."""

    pixels: torch.Tensor  # (B, 3, H, W) float32 in [0, 1]
    mask: torch.Tensor | None  # (B, 1, H, W) float32 in [0, 1], feathered; 1 = repaint; None for image-to-image
    strength: float  # the share of the schedule that is run

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[-2], self.pixels.shape[-1]


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, 8 bits a channel. PIL's own convert() clips 16- and 32-bit grayscale (I;16, I) at 255 instead of
    scaling it (a full-range gradient would come out 99 % white), so those are scaled to 0–255 first."""
    return _to_8bit(image).convert("RGB")


def to_gray(image: Image.Image) -> Image.Image:
    """One 8-bit channel (PIL's luminance for color images), 16-bit grayscale scaled as in to_rgb."""
    return _to_8bit(image).convert("L")


def _to_8bit(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16") or image.mode == "I":
        top = 65535.0 if image.mode.startswith("I;16") or np.asarray(image).max() > 255 else 255.0
        gray = np.clip(np.asarray(image, dtype=np.float64) / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, mode="L")
    return image


def rounded_size(pixels: int) -> int:
    """An init image's side rounded down to a multiple of 8 (as diffusers' image processor does)."""
    return max(SIZE_MULTIPLE, pixels // SIZE_MULTIPLE * SIZE_MULTIPLE)


def per_prompt(x, n: int, what: str) -> list:
    """One item per prompt: a single image (or mask) serves every prompt; a list or a batch gives one each."""
    if isinstance(x, (list, tuple)):
        items = [item for part in x for item in _split(part, what)]
    else:
        items = _split(x, what)
    if len(items) == 1:
        items = items * n
    if len(items) != n:
        raise ValueError(f"got {len(items)} {what}s for {n} prompts; pass one, or one per prompt")
    return items


def _split(x, what: str) -> list:
    """A batch (B, H, W, C) array or (B, C, H, W) tensor → its images; anything else is one item."""
    if isinstance(x, Image.Image):
        return [x]
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8:
            raise ValueError(f"{what} as an array must be uint8 (0–255), got {x.dtype}; pass float pixels as a torch tensor in [0, 1]")
        return list(x) if x.ndim == 4 else [x]
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise ValueError(f"{what} as a tensor must be float in [0, 1], got {x.dtype}; pass uint8 pixels as a numpy array")
        return list(x) if x.ndim == 4 else [x]
    raise ValueError(f"{what} must be a PIL image, a uint8 array, a float tensor in [0, 1] or a list of them, got {type(x).__name__}")


def size_of(item) -> tuple[int, int]:
    """(height, width) of one item."""
    if isinstance(item, Image.Image):
        return item.height, item.width
    return tuple(item.shape[:2]) if isinstance(item, np.ndarray) else tuple(item.shape[-2:])


def to_tensor(item, what: str, *, gray: bool, size: tuple[int, int]) -> torch.Tensor:
    """One item → (C, H, W) float32 in [0, 1] at `size` (PIL: LANCZOS as diffusers; tensors: antialiased bicubic)."""
    if isinstance(item, np.ndarray):
        if item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[-1] not in (1, 3, 4)):
            raise ValueError(f"{what} as an array must be (H, W), (H, W, 3) or (H, W, 4), got shape {item.shape}")
        item = Image.fromarray(item[..., 0] if item.ndim == 3 and item.shape[-1] == 1 else item)
    if isinstance(item, Image.Image):
        item = to_gray(item) if gray else to_rgb(item)
        if (item.height, item.width) != size:
            item = item.resize((size[1], size[0]), Image.Resampling.LANCZOS)
        array = np.asarray(item, dtype=np.float32) / 255.0
        return torch.from_numpy(array[None] if gray else array.transpose(2, 0, 1).copy())
    channels = 1 if gray else 3
    t = item.detach().float().cpu()
    t = t[None] if t.ndim == 2 and gray else t
    if t.ndim != 3 or t.shape[0] != channels:
        shapes = "(1, H, W) or (H, W)" if gray else "(3, H, W)"
        raise ValueError(f"{what} as a tensor must be {shapes} (or a batch of them), got shape {tuple(item.shape)}")
    if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
        raise ValueError(f"{what} as a float tensor must hold values in [0, 1] (as output_type='pt' gives)")
    if tuple(t.shape[-2:]) != size:
        t = F.interpolate(t[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)
    return t


def load(image, mask_image, n: int, size: tuple[int, int], mask_blur: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(n, 3, H, W) pixels and (n, 1, H, W) feathered masks (or None) at `size`, one per prompt.

    A mask must have its image's size: a mask drawn for another size would not line up, so it is refused rather
    than stretched.
    """
    items = per_prompt(image, n, "image")
    masks = per_prompt(mask_image, n, "mask_image") if mask_image is not None else None
    pixels = torch.stack([to_tensor(item, "image", gray=False, size=size) for item in items])
    if masks is None:
        return pixels, None
    for i, (item, mask) in enumerate(zip(items, masks)):
        if size_of(mask) != size_of(item):
            (mh, mw), (ih, iw) = size_of(mask), size_of(item)
            which = f" {i}" if n > 1 else ""
            raise ValueError(f"mask_image{which} is {mw}x{mh} but its image is {iw}x{ih}; a mask must have its image's size")
    mask = torch.stack([to_tensor(m, "mask_image", gray=True, size=size) for m in masks])
    return pixels, feather(mask, mask_blur)


def feather(mask: torch.Tensor, blur: float) -> torch.Tensor:
    """Gaussian blur of σ = `blur` px over a radius of int(2.5σ + 0.5) px (A1111's "Mask blur"), edges replicated.

    The kernel is finite, so a pixel farther than the radius from every masked pixel stays exactly 0 (kept).
    """
    radius = int(2.5 * blur + 0.5)
    if radius == 0:
        return mask
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / blur) ** 2)
    kernel = (kernel / kernel.sum()).float()
    out = F.pad(mask, (radius, radius, 0, 0), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    out = F.pad(out, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(out, kernel.view(1, 1, -1, 1)).clamp(0, 1)


def check_mask_blur(mask_blur) -> float:
    if isinstance(mask_blur, bool) or not isinstance(mask_blur, (int, float)) or not math.isfinite(mask_blur) or mask_blur < 0:
        raise ValueError(f"mask_blur must be a number of pixels of at least 0, got {mask_blur!r}")
    return float(mask_blur)


def binary(mask: torch.Tensor) -> torch.Tensor:
    """Repaint where the (feathered) mask is at least one half, as diffusers binarizes its masks."""
    return (mask >= 0.5).float()


def latent_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The binary mask at latent resolution (nearest neighbour, as diffusers' inpainting pipeline resizes it)."""
    return F.interpolate(binary(mask), size=(height, width))


def masked_pixels(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What a 9-channel inpainting UNet is shown: the picture in [-1, 1] with the repainted region set to 0 (gray)."""
    return (pixels * 2 - 1) * (1 - binary(mask))


def keep_outside(mask: torch.Tensor, image_latents: torch.Tensor, noise: torch.Tensor, scheduler):
    """Inpainting with a regular UNet, as the denoise loop's on_step hook: after step i the kept region (latent mask
    0) is the init latents re-noised to the next step's level by the sampler's own add_noise, and the clean init
    latents after the last step (diffusers' and A1111's blend)."""
    timesteps, n = scheduler.timesteps, len(image_latents)

    def blend(i, t, latents):
        kept = image_latents
        if i + 1 < len(timesteps):
            kept = scheduler.add_noise(image_latents, noise, timesteps[i + 1 : i + 2].repeat(n))
        return (1 - mask) * kept + mask * latents

    return blend


def paste_back(generated: torch.Tensor, original: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The original pixels outside the feathered mask, blended across its soft edge: where the mask is 0 the result
    is the original exactly (A1111's overlay)."""
    return generated * mask + original * (1 - mask)
