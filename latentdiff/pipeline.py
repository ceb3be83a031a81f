"""Inference only: prompts → images with a Stable Diffusion-layout model (diffusers UNet/VAE, CLIP text encoder)."""
from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import text
from .guidance import cfg_combine
from .optimize import optimize_for_inference
from .precision import default_device, resolve_dtype
from .schedulers import SAMPLERS, ScheduleConfig, get_sampler
from .schedulers.base import randn

DEFAULT_MODEL = Path(__file__).parent / "default_model"
MAX_SEED = 2**32 - 1


class ModelError(ValueError):
    """A model path that cannot be loaded, or a model that produced NaN / blank output."""


@dataclass
class GenerationOutput:
    images: list | np.ndarray | torch.Tensor  # PIL list, uint8 (B, H, W, 3), float (B, 3, H, W) in [0, 1], or latents
    seeds: list[int]


def _as_list(x, n: int, what: str) -> list:
    items = [x] * n if x is None or isinstance(x, (str, int, torch.Generator)) else list(x)
    if len(items) != n:
        raise ValueError(f"got {len(items)} {what} for {n} images; pass one, or one per image")
    return items


class LatentDiffusionPipeline:
    def __init__(self, unet, vae, text_encoder, tokenizer, schedule: ScheduleConfig, *, name: str = "", source: Path | None = None):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.schedule = schedule
        self.name = name
        self.source = source  # file or folder the weights came from (for the PNG "Model hash")
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self._hash: str | None = None

    # ---------------------------------------------------------------- loading and saving
    @classmethod
    def from_pretrained(cls, folder, *, device=None, precision: str = "auto") -> "LatentDiffusionPipeline":
        """A diffusers-format folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar is noise in a CLI
        folder = Path(folder)
        for sub in ("unet", "vae", "text_encoder"):
            if not (folder / sub / "config.json").is_file():
                raise ModelError(f"{folder} is not a diffusers-format model folder: {sub}/config.json is missing")
        device = torch.device(device) if device is not None else default_device()
        dtype = resolve_dtype(precision, device)
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
        # fp16 overflows in the SD VAE decoder (diffusers' force_upcast): keep it in float32 there.
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32 if dtype == torch.float16 else dtype)
        # transformers ≥ 5 reads both key spellings (with and without the `text_model.` prefix real SD folders carry).
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype)
        tokenizer, schedule = _read_tokenizer_and_schedule(folder)
        return cls(unet, vae, text_encoder, tokenizer, schedule, name=folder.resolve().name, source=folder).to(device)

    @classmethod
    def from_single_file(cls, path, *, device=None, precision: str = "auto", config_dir=None, prediction_type=None) -> "LatentDiffusionPipeline":
        """An original (CompVis/Stability) SD 1.x/2.x checkpoint, `.safetensors` or weights-only `.ckpt`."""
        from .checkpoints import load_single_file

        path = Path(path)
        device = torch.device(device) if device is not None else default_device()
        dtype = resolve_dtype(precision, device)
        parts = load_single_file(path, config_dir=config_dir, prediction_type=prediction_type, torch_dtype=dtype)
        return cls(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["schedule"], name=path.stem, source=path).to(device)

    @classmethod
    def from_config(cls, config_dir, *, seed: int = 0) -> "LatentDiffusionPipeline":
        """Randomly initialised components from a folder of component configs (training from scratch)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        config_dir = Path(config_dir)
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
        tokenizer, schedule = _read_tokenizer_and_schedule(config_dir)
        return cls(unet, vae, text_encoder, tokenizer, schedule, name=config_dir.name)

    def save_pretrained(self, folder, *, dtype: torch.dtype | None = None) -> None:
        """Write a diffusers-format folder (that diffusers' StableDiffusionPipeline loads) atomically: build `folder.tmp`, then rename."""
        from safetensors.torch import save_file

        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for sub, model in (("unet", self.unet), ("vae", self.vae)):
            model.save_pretrained(tmp / sub, safe_serialization=True)
            if dtype is not None:
                _recast_safetensors(tmp / sub / "diffusion_pytorch_model.safetensors", dtype)
        self.text_encoder.config.save_pretrained(tmp / "text_encoder")
        # The `text_model.` prefix is the layout real SD folders (and transformers 4) use.
        state = {("" if k.startswith("text_model.") else "text_model.") + k: v.detach().to(dtype or v.dtype).contiguous()
                 for k, v in self.text_encoder.state_dict().items() if not k.endswith("position_ids")}
        save_file(state, tmp / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
        self.tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / "scheduler").mkdir(parents=True, exist_ok=True)
        sched = {"_class_name": "DDIMScheduler", **self.schedule.to_diffusers(), "clip_sample": False, "set_alpha_to_one": False}
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
        index = {
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": _diffusers_version(),
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None], "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        if folder.exists():
            old = folder.with_name(folder.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "LatentDiffusionPipeline":
        for model in (self.unet, self.vae, self.text_encoder):
            model.to(device) if dtype is None else model.to(device, dtype)
            model.eval().requires_grad_(False)
        return self

    def load_lora(self, path, scale: float = 1.0) -> None:
        """Apply LoRA adapters saved by `latentdiff train --lora-rank N` (diffusers' load_lora_weights layout)."""
        from .training.lora import load_lora

        load_lora(self.unet, self.text_encoder, path, scale=scale)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def model_hash(self) -> str:
        """A1111-style short hash: first 10 hex digits of the sha256 of the weights file (the UNet's, for a folder)."""
        if self._hash is None:
            from .pngmeta import file_sha256

            src = self.source
            if src is not None and src.is_dir():
                src = next((src / "unet").glob("*.safetensors"), None)
            self._hash = file_sha256(src)[:10] if src is not None and src.is_file() else ""
        return self._hash

    # ---------------------------------------------------------------- generation
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        ids = text.tokenize(self.tokenizer, prompts)
        return text.encode(self.text_encoder, ids.to(self.device))  # (B, 77, D)

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        seed: int | list[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        sampler: str = "dpmpp_2m",
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        progress: bool = True,
    ) -> GenerationOutput:
        # 1. Check inputs (before any work)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        n = len(prompts)
        size = self.unet.config.sample_size * self.vae_scale
        height, width = height or size, width or size
        if n == 0:
            raise ValueError("no prompt given; pass a string or a list of strings (an empty string is an unconditional sample)")
        if height % 8 or width % 8 or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of 8, got {width}x{height}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of: {', '.join(sorted(SAMPLERS))}")
        if output_type not in ("pil", "numpy", "pt", "latents"):
            raise ValueError(f"unknown output_type {output_type!r}; expected pil, numpy, pt or latents")
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = [negative_prompt or ""] * n
        else:
            negatives = [p for p in negative_prompt for _ in range(num_images_per_prompt)]
            if len(negatives) != n:
                raise ValueError(f"got {len(negative_prompt)} negative prompts for {n // num_images_per_prompt} prompts; pass one, or one per prompt")

        # 2. One seed and one CPU generator per image, so an image never depends on its batch
        if generator is not None:
            generators = _as_list(generator, n, "generators")
            seeds = [g.initial_seed() for g in generators]
        else:
            if seed is None:
                seeds = [secrets.randbelow(MAX_SEED) for _ in range(n)]
            elif isinstance(seed, int):
                seeds = [seed + i for i in range(n)]
            else:
                seeds = _as_list(seed, n, "seeds")
            generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

        # 3. Encode prompts; with guidance, [uncond; cond] go through the UNet as one batch
        do_cfg = guidance_scale > 1.0
        context = self.encode_prompts(negatives + prompts if do_cfg else prompts)  # (2B or B, 77, D)

        # 4. Timesteps
        scheduler = get_sampler(sampler, self.schedule, **({"eta": eta} if sampler == "ddim" else {}))
        scheduler.set_timesteps(num_inference_steps, device=self.device)

        # 5. Initial latents x_T ~ N(0, σ_max² I), drawn on the CPU per image
        shape = (n, self.unet.config.in_channels, height // self.vae_scale, width // self.vae_scale)
        if latents is None:
            latents = randn(shape, generators, torch.device("cpu"), torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = (latents.float() * scheduler.init_noise_sigma).to(self.device)

        # 6. Denoising loop
        from tqdm.auto import tqdm

        for i, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="sampling", leave=False)):
            x_in = scheduler.scale_model_input(latents, t)
            x_in = torch.cat([x_in, x_in]) if do_cfg else x_in
            eps = self.unet(x_in.to(self.dtype), t, encoder_hidden_states=context, return_dict=False)[0]
            if do_cfg:
                eps_uncond, eps_cond = eps.float().chunk(2)
                eps = cfg_combine(eps_uncond, eps_cond, guidance_scale)
            latents = scheduler.step(eps.float(), t, latents, generator=generators)
            if callback is not None:
                callback(i, int(t), latents)
        if not torch.isfinite(latents).all():
            raise ModelError("the UNet produced NaN/inf latents; try --precision fp32 (fp16 can overflow)")
        if output_type == "latents":
            return GenerationOutput(latents, seeds)

        # 7. Decode
        images = self.decode(latents)  # (B, 3, H, W) float32 in [0, 1]
        if output_type == "pt":
            return GenerationOutput(images, seeds)
        arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        if output_type == "numpy":
            return GenerationOutput(arr, seeds)
        from PIL import Image

        return GenerationOutput([Image.fromarray(a) for a in arr], seeds)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """x_0 latents → images in [0, 1]; the VAE's own dtype, float32 output."""
        vae_dtype = self.vae.dtype
        image = self.vae.decode((latents / self.vae.config.scaling_factor).to(vae_dtype), return_dict=False)[0].float()
        if not torch.isfinite(image).all():
            raise ModelError("the VAE decoder produced NaN/inf pixels; decode in float32 (--precision fp32)")
        image = (image / 2 + 0.5).clamp(0, 1)
        if (image == 0).all():
            raise ModelError("the VAE decoder produced an all-black image; the model weights are likely broken")
        return image


def load_pipeline(model=None, *, device=None, precision: str = "auto", optimize: bool = True, compile: bool = False,
                  **kwargs) -> LatentDiffusionPipeline:
    """A diffusers-format folder, an SD single file (.safetensors/.ckpt), or None for the shipped default model.

    The inference speed levers of `optimize.py` are applied unless `optimize=False` (training: tiled VAE *encoding*
    would change latents); `compile=True` adds torch.compile of the UNet.
    """
    path = Path(model) if model is not None else DEFAULT_MODEL
    if not path.exists():
        if model is None:
            raise ModelError(f"the shipped default model is missing from {path}; reinstall latentdiff or pass a model path")
        raise ModelError(f"model path {path} does not exist; expected a diffusers-format folder or a .safetensors/.ckpt file")
    if path.is_dir():
        pipe = LatentDiffusionPipeline.from_pretrained(path, device=device, precision=precision)
    elif path.suffix.lower() not in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        raise ModelError(f"model file {path} has an unknown extension; expected .safetensors or .ckpt")
    else:
        pipe = LatentDiffusionPipeline.from_single_file(path, device=device, precision=precision, **kwargs)
    return optimize_for_inference(pipe, compile=compile) if optimize else pipe


def _read_tokenizer_and_schedule(folder: Path):
    """tokenizer/ (else the bundled CLIP vocabulary) and scheduler/scheduler_config.json (else SD's schedule)."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer") if (folder / "tokenizer").is_dir() else text.build_clip_tokenizer()
    sched_file = folder / "scheduler" / "scheduler_config.json"
    schedule = ScheduleConfig.from_diffusers(json.loads(sched_file.read_text())) if sched_file.is_file() else ScheduleConfig()
    return tokenizer, schedule


def _recast_safetensors(file: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import load_file, save_file

    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(file).items()}
    save_file(state, file, metadata={"format": "pt"})


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
