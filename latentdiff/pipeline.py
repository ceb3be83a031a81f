"""Inference only: prompts → images with a Stable Diffusion-layout model (diffusers UNet/VAE, CLIP text encoder)."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import images, text
from .conditioning import CLIPConditioner, Condition, SDXLConditioner, SizeConditioning, cat, stack
from .config import DEFAULTS
from .devices import default_device
from .errors import ModelError
from .files import atomic_dir, file_sha256
from .adapters.embeddings import Embeddings
from .adapters.lora import Loras, adapter_name, find_lora, lora_tags
from .guidance import cfg_combine, rescale_guidance, unconditional_skips
from .model_defaults import ModelDefaults
from .optimize import optimize_for_inference
from .precision import component_dtypes
from .schedulers import ScheduleConfig, get_sampler, randn
from .schedulers.schedules import start_index
from .vae import decode as decode_latents, encode as encode_pixels

DEFAULT_MODEL = Path(__file__).parent / "default_model"
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes any uint64
RANDOM_SEEDS = 2**32  # seed=None draws below this, short enough to type back in
OUTPUT_TYPES = ("pil", "numpy", "pt", "latents")
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # single files: safetensors, or weights-only pickles


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
    def __init__(self, unet, vae, text_encoder, tokenizer, schedule: ScheduleConfig, *, text_encoder_2=None,
                 tokenizer_2=None, force_zeros_for_empty_prompt: bool = True, name: str = "", source: Path | None = None,
                 defaults: ModelDefaults = ModelDefaults()):
        """SD 1.x/2.x: one text encoder; SDXL (a UNet with the "text_time" added embedding): `text_encoder_2` (ViT-bigG
        with projection) and `tokenizer_2` too, and `force_zeros_for_empty_prompt` as in its model_index.json.
        `defaults`: the sampling settings the model recommends for itself (model_defaults.py)."""
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.schedule = schedule
        self.defaults = defaults
        self.name = name
        self.source = source  # file or folder the weights came from (for the PNG "Model hash")
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.is_sdxl = unet.config.get("addition_embed_type") == "text_time"
        if self.is_sdxl != (text_encoder_2 is not None and tokenizer_2 is not None):
            raise ModelError("an SDXL UNet (added \"text_time\" embedding) needs text_encoder_2 and tokenizer_2, and only "
                             "it takes them")
        self.conditioner = (SDXLConditioner((tokenizer, tokenizer_2), (text_encoder, text_encoder_2),
                                            zero_empty_negative=force_zeros_for_empty_prompt)
                            if self.is_sdxl else CLIPConditioner(tokenizer, text_encoder))
        self.denoiser = EagerUNet(unet)  # ε(x_t, t, condition); optimize.py may swap in CUDA-graph replay
        self.loras = Loras(unet, self.named_text_encoders)
        self.embeddings = Embeddings({"text_encoder": (tokenizer, text_encoder),
                                      "text_encoder_2": (tokenizer_2, text_encoder_2)})
        self._hash: str | None = None

    @property
    def text_encoders(self) -> tuple:
        return self.conditioner.text_encoders

    @property
    def named_text_encoders(self) -> dict:
        """The text encoders by diffusers' component names, the prefixes LoRA files give them: "text_encoder"
        (SDXL: + "text_encoder_2")."""
        return dict(zip(("text_encoder", "text_encoder_2"), self.text_encoders))

    # ---------------------------------------------------------------- loading and saving
    @classmethod
    def from_pretrained(cls, folder, *, device=None, precision: str = "auto") -> "LatentDiffusionPipeline":
        """A diffusers-format folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar is noise in a CLI
        folder = Path(folder)
        for sub in ("unet", "vae", "text_encoder"):
            if not (folder / sub / "config.json").is_file():
                raise ModelError(f"{folder} is not a diffusers-format model folder: {sub}/config.json is missing")
        device = torch.device(device) if device is not None else default_device()
        force_upcast = AutoencoderKL.load_config(folder / "vae").get("force_upcast", True)
        dtypes = component_dtypes(precision, device, vae_force_upcast=force_upcast)
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtypes.unet)
        autoencoder = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtypes.vae)
        # transformers ≥ 5 reads both key spellings (with and without the `text_model.` prefix real SD folders carry).
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtypes.text_encoder)
        tokenizer, schedule = _read_tokenizer_and_schedule(folder)
        sdxl = {}
        if (folder / "text_encoder_2" / "config.json").is_file():  # StableDiffusionXLPipeline's layout
            index = folder / "model_index.json"
            sdxl = {"text_encoder_2": CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2",
                                                                                  torch_dtype=dtypes.text_encoder),
                    "tokenizer_2": CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
                    "force_zeros_for_empty_prompt": (json.loads(index.read_text()) if index.is_file() else {})
                    .get("force_zeros_for_empty_prompt", True)}
        return cls(unet, autoencoder, text_encoder, tokenizer, schedule, name=folder.resolve().name, source=folder,
                   defaults=ModelDefaults.read(folder), **sdxl).to(device)

    @classmethod
    def from_single_file(cls, path, *, device=None, precision: str = "auto", config_dir=None, prediction_type=None,
                         ema: bool = False) -> "LatentDiffusionPipeline":
        """An original (CompVis/Stability) SD 1.x/2.x or SDXL (sgm) checkpoint, `.safetensors` or weights-only `.ckpt`
        (`ema`: its UNet's EMA weights)."""
        from .checkpoints import load_single_file

        path = Path(path)
        device = torch.device(device) if device is not None else default_device()
        parts = load_single_file(path, config_dir=config_dir, prediction_type=prediction_type, precision=precision,
                                 device=device, ema=ema)
        sdxl = {k: parts[k] for k in ("text_encoder_2", "tokenizer_2") if k in parts}
        return cls(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["schedule"], name=path.stem,
                   source=path, **sdxl).to(device)

    @classmethod
    def from_config(cls, config_dir, *, seed: int = 0) -> "LatentDiffusionPipeline":
        """Randomly initialised components from a folder of component configs (training from scratch)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        config_dir = Path(config_dir)
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
        autoencoder = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
        tokenizer, schedule = _read_tokenizer_and_schedule(config_dir)
        sdxl = {}
        if (config_dir / "text_encoder_2" / "config.json").is_file():  # SDXL: ViT-bigG with its projection
            sdxl = {"text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config_dir / "text_encoder_2")),
                    "tokenizer_2": text.read_tokenizer(config_dir, name="tokenizer_2")}
        return cls(unet, autoencoder, text_encoder, tokenizer, schedule, name=config_dir.name, **sdxl)

    def save_pretrained(self, folder, *, dtype: torch.dtype | None = None) -> None:
        """Write a diffusers-format folder (that diffusers' StableDiffusionPipeline, or StableDiffusionXLPipeline, loads)
        atomically: built beside it, then swapped in."""
        from safetensors.torch import save_file

        from .checkpoints import folder_text_encoder_state

        with atomic_dir(folder) as tmp:
            for sub, model in (("unet", self.unet), ("vae", self.vae)):
                model.save_pretrained(tmp / sub, safe_serialization=True)
                if dtype is not None:
                    _recast_safetensors(tmp / sub / "diffusion_pytorch_model.safetensors", dtype)
            suffixes = ("", "_2") if self.is_sdxl else ("",)
            for suffix, encoder, tokenizer in zip(suffixes, self.text_encoders, self.conditioner.tokenizers):
                encoder.config.save_pretrained(tmp / f"text_encoder{suffix}")
                state = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in folder_text_encoder_state(encoder).items()}
                save_file(state, tmp / f"text_encoder{suffix}" / "model.safetensors", metadata={"format": "pt"})
                tokenizer.save_pretrained(tmp / f"tokenizer{suffix}")
            (tmp / "scheduler").mkdir()
            sched = {"_class_name": "DDIMScheduler", **self.schedule.to_diffusers(), "clip_sample": False, "set_alpha_to_one": False}
            (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
            index = {
                "_class_name": "StableDiffusionInpaintPipeline" if self.is_inpainting_model else "StableDiffusionPipeline",
                "_diffusers_version": _diffusers_version(),
                "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None], "feature_extractor": [None, None],
                "requires_safety_checker": False,
            }
            if self.is_sdxl:
                index = {k: v for k, v in index.items() if k not in ("safety_checker", "feature_extractor", "requires_safety_checker")}
                index |= {"_class_name": "StableDiffusionXLPipeline",
                          "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                          "tokenizer_2": ["transformers", "CLIPTokenizer"],
                          "force_zeros_for_empty_prompt": self.conditioner.zero_empty_negative}
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
            self.defaults.write(tmp)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "LatentDiffusionPipeline":
        for model in (self.unet, self.vae, *self.text_encoders):
            model.to(device) if dtype is None else model.to(device, dtype)
            model.eval().requires_grad_(False)
        return self

    def load_lora(self, path, scale: float = 1.0, name: str | None = None) -> str:
        """Add a LoRA file (latentdiff's, diffusers' or kohya/A1111's layout) as adapter `name` (default: from the
        file name) at `scale`, beside those already loaded; returns its name."""
        name = self.loras.load(path, scale=scale, name=name)
        self.denoiser.reset()  # new layers in the UNet: captured graphs would not run them
        return name

    def set_lora_scales(self, scales: dict[str, float]) -> None:
        """Change loaded LoRAs' scales ({name: scale}); nothing is reloaded or merged."""
        self.loras.set_scales(scales)

    def unload_lora(self, name: str) -> None:
        self.loras.unload(name)
        self.denoiser.reset()

    def load_embedding(self, path, token: str | None = None) -> str:
        """Add a textual-inversion embedding (A1111 .pt/.safetensors or diffusers learned_embeds) as the word `token`
        (default: the file name, or the token a diffusers file stores); returns the word prompts use."""
        return self.embeddings.load(path, token)

    def prompt_loras(self, prompts: list[str], lora_dir=None) -> tuple[list[str], dict[str, float]]:
        """(prompts without their `<lora:name:w>` tags, {name: w}); tagged LoRAs not loaded yet are loaded from
        `lora_dir` (at scale 0 outside the generations that name them). Every prompt of one call must name the
        same LoRAs: they apply to the whole batch."""
        parsed = [lora_tags(p) for p in prompts]
        tags = parsed[0][1] if parsed else {}
        if any(t != tags for _, t in parsed):
            raise ValueError("the prompts of one call name different <lora:…> tags; generate them in separate calls.")
        for name in tags:
            if adapter_name(name) not in self.loras.files:
                if lora_dir is None:
                    raise ValueError(f"the prompt names <lora:{name}>, which is not loaded; give lora_dir= (the "
                                     "folder of LoRA files) or load it first with load_lora().")
                self.load_lora(find_lora(name, lora_dir), scale=0.0, name=name)
        return [p for p, _ in parsed], {adapter_name(n): w for n, w in tags.items()}

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
            src = self.source
            if src is not None and src.is_dir():
                src = next((src / "unet").glob("*.safetensors"), None)
            self._hash = file_sha256(src)[:10] if src is not None and src.is_file() else ""
        return self._hash

    # ---------------------------------------------------------------- generation, stage by stage
    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        *,
        image=None,
        mask_image=None,
        strength: float | None = None,
        mask_blur: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = DEFAULTS.steps,
        guidance_scale: float = DEFAULTS.guidance_scale,
        num_images_per_prompt: int = 1,
        seed: int | list[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        sampler: str = DEFAULTS.sampler,
        scheduler: str | None = None,
        eta: float = DEFAULTS.eta,
        clip_skip: int = DEFAULTS.clip_skip,
        guidance_rescale: float = DEFAULTS.guidance_rescale,
        guidance_min_sigma: float | None = DEFAULTS.guidance_min_sigma,
        guidance_min_sigma_all_steps: bool | None = DEFAULTS.guidance_min_sigma_all_steps,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        progress: bool = True,
        lora_dir: str | Path | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
    ) -> GenerationOutput:
        """Text to image; with `image`, image-to-image; with `image` and `mask_image`, inpainting.

        check → generators → encode prompts → initial latents (noise, or the init latents noised to `strength`) →
        denoise (inpainting: the 9-channel UNet sees the mask, a regular one gets the kept region blended back in
        every step) → decode (→ the original pixels pasted back outside the feathered mask). A1111's `<lora:name:w>`
        tags in the prompts apply those LoRAs (from `lora_dir`, see prompt_loras) to this call only. SDXL models take
        the size and crop micro-conditioning (`original_size`, … as diffusers' StableDiffusionXLPipeline; see
        conditioning.SizeConditioning).
        """
        sizes = SizeConditioning(original_size, tuple(crops_coords_top_left), target_size, negative_original_size,
                                 negative_crops_coords_top_left, negative_target_size)
        texts, tags = [prompt] if isinstance(prompt, str) else prompt, {}
        if isinstance(texts, (list, tuple)) and all(isinstance(p, str) for p in texts) and "<lora:" in "".join(texts):
            prompt, tags = self.prompt_loras(list(texts), lora_dir)
        with self.loras.scaled(tags):
            if prompt_embeds is not None:  # the caller's own context stands in for the prompt text
                prompt = [""] * len(prompt_embeds)
            prompts, negatives = self.check_inputs(prompt, negative_prompt, num_images_per_prompt)
            init = self.prepare_image(image, mask_image, len(prompts) // num_images_per_prompt, num_images_per_prompt,
                                      height, width, strength, mask_blur)
            height, width = self.check_size(height, width) if init is None else init.size
            check_steps_and_output(num_inference_steps, output_type)
            start = 0 if init is None else start_index(num_inference_steps, init.strength)
            if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
                raise ValueError(f"guidance_scale must be a finite number (≤ 1 turns guidance off), got {guidance_scale!r}")
            self.check_unet(inpainting=init is not None and init.mask is not None)
            if not 0 <= guidance_rescale <= 1:
                raise ValueError(f"guidance_rescale must be between 0 and 1 (Lin et al. 2023's φ), got {guidance_rescale!r}")
            min_sigma = self.defaults.resolve(guidance_min_sigma, guidance_min_sigma_all_steps)
            scheduler = get_sampler(sampler, self.schedule, scheduler, eta=eta)
            seeds, generators = make_generators(len(prompts), seed, generator)
            do_cfg = guidance_scale > 1.0
            if prompt_embeds is None:
                context = self.encode_prompt(prompts, negatives if do_cfg else None, clip_skip=clip_skip,
                                             size=(height, width, sizes))
            else:
                context = self.embeds_context((prompt_embeds, pooled_prompt_embeds),
                                              (negative_prompt_embeds, negative_pooled_prompt_embeds), negatives,
                                              num_images_per_prompt, do_cfg, clip_skip, size=(height, width, sizes))
            scheduler.set_timesteps(num_inference_steps, device=self.device)
            condition = blend = None
            if init is None:
                latents = self.prepare_latents(len(prompts), height, width, generators, scheduler, latents)
            else:
                latents, condition, blend = self.prepare_init_latents(init, generators, scheduler, start, latents)

            def on_step(i, t, x):
                x = blend(i, t, x) if blend else x
                if callback:
                    callback(i, int(t), x)
                return x

            latents = self.denoise(latents, context, scheduler, guidance_scale, generators, start=start, condition=condition,
                                   on_step=on_step if blend or callback else None, progress=progress,
                                   guidance_rescale=guidance_rescale, guidance_min_sigma=min_sigma)
            check_latents(latents)
            if output_type == "latents":
                return GenerationOutput(latents, seeds)
            pixels = self.decode(latents)
            if init is not None and init.mask is not None:
                pixels = images.paste_back(pixels, init.pixels.to(pixels.device), init.mask.to(pixels.device))
            return GenerationOutput(to_output(pixels, output_type), seeds)

    def check_inputs(self, prompt, negative_prompt, num_images_per_prompt: int) -> tuple[list[str], list[str]]:
        """Prompts and negative prompts, one per image."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a list of strings, got {_type_name(prompt)}")
        if not prompts:
            raise ValueError("no prompt given; pass a string or a list of strings (an empty string is an unconditional sample)")
        if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer of at least 1, got {num_images_per_prompt!r}")
        if negative_prompt is None or isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt or ""] * len(prompts)
        elif not isinstance(negative_prompt, (list, tuple)) or not all(isinstance(p, str) for p in negative_prompt):
            raise ValueError(f"negative_prompt must be a string or a list of strings, got {_type_name(negative_prompt)}")
        elif len(negative_prompt) != len(prompts):
            raise ValueError(f"got {len(negative_prompt)} negative prompts for {len(prompts)} prompts; pass one, or one per prompt")
        repeat = lambda items: [p for p in items for _ in range(num_images_per_prompt)]  # noqa: E731
        return repeat(prompts), repeat(negative_prompt)

    def check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width) in pixels; None is the model's native size."""
        native = self.unet.config.sample_size * self.vae_scale
        height, width = native if height is None else height, native if width is None else width
        multiple = images.SIZE_MULTIPLE
        if not (_is_int(height) and _is_int(width)) or height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of 8 (in pixels), got width={width!r}, height={height!r}")
        return height, width

    def check_unet(self, inpainting: bool) -> None:
        """A regular UNet takes the latents; an inpainting one (sd-1.5-inpainting) also the mask and masked image."""
        if self.unet.config.in_channels == self.latent_channels:
            return
        if not self.is_inpainting_model:
            raise ValueError(f"the UNet takes {self.unet.config.in_channels} input channels; latentdiff runs "
                             f"{self.latent_channels} (Stable Diffusion) or {2 * self.latent_channels + 1} (SD inpainting)")
        if not inpainting:
            raise ValueError("this model's UNet is an inpainting UNet (9 input channels: latents, mask, masked image); "
                             "pass image= and mask_image=")

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def is_inpainting_model(self) -> bool:
        """The sd-1.5-inpainting layout: the UNet's input is [latents; mask; masked-image latents]."""
        return self.unet.config.in_channels == 2 * self.latent_channels + 1

    def prepare_image(self, image, mask_image, n_prompts: int, per_prompt: int, height, width, strength, mask_blur):
        """Init images (and feathered masks), one per generated image, at (height, width): by default the first
        image's size rounded down to multiples of 8. None without `image` (text to image)."""
        if image is None:
            for name, value in (("mask_image", mask_image), ("strength", strength), ("mask_blur", mask_blur)):
                if value is not None:
                    raise ValueError(f"{name} needs an init image; pass image= as well")
            return None
        if mask_image is None and mask_blur is not None:
            raise ValueError("mask_blur feathers an inpainting mask; pass mask_image= as well")
        h, w = (images.rounded_size(v) for v in images.size_of(images.per_prompt(image, n_prompts, "image")[0]))
        height, width = self.check_size(h if height is None else height, w if width is None else width)
        if strength is None:
            strength = DEFAULTS.strength if mask_image is None else DEFAULTS.inpaint_strength
        blur = images.check_mask_blur(DEFAULTS.mask_blur if mask_blur is None else mask_blur)
        pixels, mask = images.load(image, mask_image, n_prompts, (height, width), blur)
        repeat = lambda x: None if x is None else x.repeat_interleave(per_prompt, dim=0)  # noqa: E731
        return images.InitImages(repeat(pixels), repeat(mask), strength)

    def estimate_step_bytes(self, batch: int, height: int, width: int, guidance: bool) -> int:
        """A rough peak of the UNet's activations in one denoising step: the skip connections it keeps (every
        down-block output) plus a working set of ~16 tensors at the widest level, for 2·batch images with guidance."""
        cfg = self.unet.config
        h, w = height // self.vae_scale, width // self.vae_scale
        skips = sum((cfg.layers_per_block + 1) * c * (h >> i) * (w >> i) for i, c in enumerate(cfg.block_out_channels))
        work = max(16 * c * (h >> i) * (w >> i) for i, c in enumerate(cfg.block_out_channels))
        return (2 if guidance else 1) * batch * (skips + work) * self.dtype.itemsize

    def encode_prompt(self, prompts: list[str], negatives: list[str] | None = None, *, clip_skip: int = 1,
                      size: tuple[int, int, SizeConditioning] | None = None):
        """The UNet's Condition: context (B, 77·k, D) (SDXL: + text_embeds, time_ids); with negatives, [uncond; cond]
        (2B rows) for one CFG batch through the UNet.

        Prompts use A1111's syntax (weights, BREAK) and any length (75-token chunks, text.encode_prompts); an image's
        negative is padded with empty chunks to its prompt's length or the other way round (SDXL: an empty negative
        is zeros, `conditioner.zero_empty_negative`). Images whose contexts differ in length go through the UNet in
        separate groups: a list of (image indices, Condition) — never padded to a batch mate's length, so an image
        does not depend on its batch. `size`: (height, width, SDXL's size conditioning), default the native size.
        """
        encoded = self._encode_texts((negatives or []) + prompts, clip_skip)
        conds = encoded[len(negatives or []):]
        pairs = [(u, c) for u, c in zip(encoded, conds)] if negatives is not None else [(None, c) for c in conds]
        if any(u is not None and _length(u) != _length(c) for u, c in pairs):
            pad = self._empty_chunk(clip_skip)
            pairs = [(_pad_to(u, _length(c), pad), _pad_to(c, _length(u), pad)) if u is not None else (u, c) for u, c in pairs]
        return self._condition(pairs, negatives, size)

    def _condition(self, pairs: list, negatives: list[str] | None, size):
        """(uncond or None, cond) Conditions per image → the UNet's: the uncond of an empty negative prompt zeroed
        where the model asks for it (SDXL; `negatives`: the prompts the unconds were encoded from, None for the
        caller's own), the time ids added, grouped by context length (_group_contexts)."""
        height, width, sizes = size or (*self.check_size(None, None), SizeConditioning())
        time_ids, negative_time_ids = sizes.time_ids(height, width)
        if negatives is not None and self.conditioner.zero_empty_negative:
            pairs = [(c.map(torch.zeros_like) if n == "" else u, c) for n, (u, c) in zip(negatives, pairs)]
        with_ids = self.conditioner.with_time_ids
        pairs = [(None if u is None else with_ids(u, negative_time_ids), with_ids(c, time_ids)) for u, c in pairs]
        return _group_contexts(pairs)

    def embeds_context(self, embeds, negative_embeds, negatives, per_prompt: int, do_cfg: bool, clip_skip, size):
        """The Condition for caller-made embeddings, as diffusers takes them: `embeds` = (prompt_embeds (n, L, D),
        pooled_prompt_embeds (n, P): SDXL's, None otherwise), `negative_embeds` the same for the negatives, or
        (None, None) to encode the negative prompts (padded with empty chunks to L; SDXL zeroes an empty one)."""
        conds = self._given_conditions(*embeds, per_prompt, "prompt_embeds")
        if not do_cfg:
            return self._condition([(None, c) for c in conds], None, size)
        if negative_embeds[0] is not None:
            if negative_embeds[0].shape != embeds[0].shape:
                raise ValueError(f"negative_prompt_embeds must have the shape of prompt_embeds {tuple(embeds[0].shape)}, "
                                 f"got {tuple(negative_embeds[0].shape)}")
            unconds = self._given_conditions(*negative_embeds, per_prompt, "negative_prompt_embeds")
            return self._condition(list(zip(unconds, conds)), None, size)
        pad = self._empty_chunk(clip_skip)
        unconds = [_pad_to(u, _length(c), pad) for u, c in zip(self._encode_texts(negatives, clip_skip), conds)]
        if any(_length(u) != _length(c) for u, c in zip(unconds, conds)):
            raise ValueError(f"the negative prompt needs {max(map(_length, unconds))} tokens of context, prompt_embeds "
                             f"have {_length(conds[0])}; pass negative_prompt_embeds")
        return self._condition(list(zip(unconds, conds)), negatives, size)

    def _given_conditions(self, embeds, pooled, per_prompt: int, name: str) -> list[Condition]:
        """One Condition per image from the caller's `embeds` (n, L, D) and, for SDXL, `pooled` (n, P)."""
        pooled_name = name.replace("prompt_embeds", "pooled_prompt_embeds")
        if self.is_sdxl and pooled is None:
            raise ValueError(f"SDXL needs {pooled_name} (n, {self.text_encoder_2.config.projection_dim}), the second text "
                             f"encoder's pooled projection, with {name}, as diffusers' StableDiffusionXLPipeline does")
        if not self.is_sdxl and pooled is not None:
            raise ValueError(f"{pooled_name} are SDXL's; this model takes {name} alone")
        if pooled is not None and (pooled.ndim != 2 or len(pooled) != len(embeds)):
            raise ValueError(f"{pooled_name} must have one row per row of {name} ({len(embeds)}, P), "
                             f"got {tuple(pooled.shape)}")
        rows = embeds.to(self.device, self.text_encoder.dtype).repeat_interleave(per_prompt, dim=0)
        pooled = None if pooled is None else pooled.to(rows).repeat_interleave(per_prompt, dim=0)
        return [Condition(rows[i], None if pooled is None else pooled[i]) for i in range(len(rows))]

    def _encode_texts(self, prompts: list[str], clip_skip: int) -> list[Condition]:
        """The conditioner's encoding, with the loaded embeddings' words expanded to their tokens."""
        return self.conditioner.encode([self.embeddings.expand(p) for p in prompts], clip_skip)

    def _empty_chunk(self, clip_skip: int) -> Condition:
        """The Condition of one empty chunk (context (77, D)): what a shorter prompt or negative is padded with (as A1111)."""
        return self.conditioner.encode([""], clip_skip)[0]

    def prepare_latents(self, n: int, height: int, width: int, generators, scheduler, latents=None) -> torch.Tensor:
        """x_T ~ N(0, σ_max² I): standard noise drawn on the CPU per image (or the given `latents`), scaled."""
        shape = (n, self.latent_channels, height // self.vae_scale, width // self.vae_scale)
        return (standard_noise(shape, generators, latents) * scheduler.init_noise_sigma).to(self.device)

    def prepare_init_latents(self, init: images.InitImages, generators, scheduler, start: int, noise=None):
        """Image-to-image and inpainting start at timesteps[start] from the init latents noised with the sampler's
        own add_noise (inpainting at strength 1: from pure noise, as text to image).

        Each image's generator draws in diffusers' order: the init image's posterior sample (when it is used), the
        noise (or the given standard-normal `noise`), then the masked image's posterior sample (9-channel UNet).
        Returns (latents, condition: the 9-channel UNet's extra input or None, blend: the per-step hook or None).
        """
        n, (h, w) = len(init.pixels), (s // self.vae_scale for s in init.size)
        inpaint = init.mask is not None
        pure_noise = inpaint and init.strength == 1.0
        blend_in = inpaint and not self.is_inpainting_model
        image_latents = self.encode(init.pixels * 2 - 1, generators) if blend_in or not pure_noise else None
        shape = (n, self.latent_channels, h, w)
        noise = standard_noise(shape, generators, noise).to(self.device)
        if pure_noise:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(image_latents.to(self.device), noise, scheduler.timesteps[start:start + 1].repeat(n))
        if not inpaint:
            return latents, None, None
        mask = images.latent_mask(init.mask, h, w).to(self.device)
        if blend_in:
            # diffusers encodes the masked image here for a regular UNet too and discards it: the same draw keeps
            # every later one (a stochastic sampler's) equal to diffusers'
            standard_noise(shape, generators)
            return latents, None, images.keep_outside(mask, image_latents.to(self.device), noise, scheduler)
        masked = self.encode(images.masked_pixels(init.pixels, init.mask), generators).to(self.device)
        return latents, torch.cat([mask, masked], dim=1), None

    def denoise(self, latents, context, scheduler, guidance_scale: float, generators, *, start: int = 0,
                condition: torch.Tensor | None = None, on_step: Callable | None = None, progress: bool = False,
                guidance_rescale: float = 0.0, guidance_min_sigma: tuple[float, bool] = (0.0, False)) -> torch.Tensor:
        """The sampling loop over scheduler.timesteps[start:]; float32 latents in and out.

        With guidance (> 1), `context` is [uncond; cond] and one UNet call serves both, except on the steps where
        `guidance_min_sigma` (σ, all steps) skips the unconditional pass (guidance.unconditional_skips). `condition`
        is joined to the UNet's input channels (a 9-channel inpainting UNet's mask and masked-image latents). `on_step(i, t, latents)`
        runs after every step; a tensor it returns replaces the latents (a hook can blend in what must be kept).
        Nothing in the loop reads a device value back to the host (no sync per step): `check_latents` after it.
        """
        from tqdm.auto import tqdm

        do_cfg = guidance_scale > 1.0
        skips = unconditional_skips(scheduler.sigma_list, start, *guidance_min_sigma) if do_cfg else []
        cond_only = conditional_rows(context) if any(skips) else None
        scheduler.set_begin_index(start)  # the step count is known: no read-back of t from the device
        for i, t in enumerate(tqdm(scheduler.timesteps[start:], disable=not progress, desc="sampling", leave=False), start):
            x_in = scheduler.scale_model_input(latents, t)
            x_in = x_in if condition is None else torch.cat([x_in, condition], dim=1)
            if do_cfg and skips[i]:
                eps = self.predict(x_in, t, cond_only, None)
            else:
                eps = self.predict(x_in, t, context, guidance_scale if do_cfg else None, guidance_rescale)
            latents = scheduler.step(eps, t, latents, generator=generators)
            if on_step is not None:
                replaced = on_step(i, t, latents)
                latents = latents if replaced is None else replaced
        return latents

    def predict(self, x_in, t, context, guidance_scale: float | None, guidance_rescale: float = 0.0) -> torch.Tensor:
        """The model output for x_t (B, C, h, w), float32: with guidance, one UNet call on [x; x] and
        ε̂ = ε_u + s·(ε_c − ε_u) (rescaled by φ = guidance_rescale); per group when contexts differ in length."""
        if isinstance(context, list):
            out = torch.empty(x_in.shape[0], self.unet.config.out_channels, *x_in.shape[2:], device=x_in.device)
            for index, group_context in context:
                out[index] = self.predict(x_in[index], t, group_context, guidance_scale, guidance_rescale)
            return out
        x_in = torch.cat([x_in, x_in]) if guidance_scale is not None else x_in
        eps = self.denoiser(x_in.to(self.dtype), t, context).float()
        if guidance_scale is None:
            return eps
        eps_uncond, eps_cond = eps.chunk(2)
        guided = cfg_combine(eps_uncond, eps_cond, guidance_scale)
        return rescale_guidance(guided, eps_cond, guidance_rescale) if guidance_rescale else guided

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images (B, 3, H, W) in [0, 1], float32."""
        return decode_latents(self.vae, latents)

    def encode(self, pixels: torch.Tensor, generator=None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] → scaled latents, a posterior sample drawn with `generator` (or with one
        generator per image, from a list)."""
        return encode_pixels(self.vae, pixels, generator)


def conditional_rows(context):
    """The conditional half of a guided context ([uncond; cond] rows, or groups of them): what a step without
    the unconditional pass runs on."""
    if isinstance(context, list):
        return [(index, conditional_rows(group)) for index, group in context]
    return context.map(lambda x: x[len(x) // 2:])


def _length(condition: Condition) -> int:
    return len(condition.context)


def _pad_to(condition: Condition, length: int, empty_chunk: Condition) -> Condition:
    """An image's context (L, D) padded with empty-prompt chunks (77, D) to `length` tokens (as A1111 pads a shorter
    negative); SDXL's text_embeds stay the first chunk's."""
    missing = (length - _length(condition)) // _length(empty_chunk)
    if missing <= 0:
        return condition
    return dataclasses.replace(condition, context=torch.cat([condition.context, *[empty_chunk.context] * missing]))


def _group_contexts(pairs):
    """One Condition (2B or B rows) when every image's context has one length (uncond rows first); else a list of
    (image indices, Condition) groups of equal length."""
    lengths = [_length(c) for _, c in pairs]

    def rows(members):
        conds = stack([pairs[i][1] for i in members])
        return conds if pairs[0][0] is None else cat([stack([pairs[i][0] for i in members]), conds])

    if len(set(lengths)) == 1:
        return rows(range(len(pairs)))
    device = pairs[0][1].context.device
    return [(torch.tensor([i for i, n in enumerate(lengths) if n == length], device=device),
             rows([i for i, n in enumerate(lengths) if n == length])) for length in sorted(set(lengths))]


def standard_noise(shape: tuple, generators, given: torch.Tensor | None = None) -> torch.Tensor:
    """ε ~ N(0, I) of `shape`, float32 on the CPU, each image drawn from its own generator (or the caller's
    `latents`, checked for shape)."""
    if given is None:
        return randn(shape, generators, torch.device("cpu"), torch.float32)
    if tuple(given.shape) != shape:
        raise ValueError(f"latents (the initial noise) must have shape {shape}, got {tuple(given.shape)}")
    return given.float()


def check_latents(latents: torch.Tensor) -> None:
    """One finiteness check after the loop (the only host sync of sampling)."""
    if not torch.isfinite(latents).all():
        raise ModelError("the UNet produced NaN/inf latents; try --precision fp32 (fp16 can overflow)")


class EagerUNet:
    """The UNet called as the denoising loop needs it: (x_t, t, Condition) → model output."""

    def __init__(self, unet):
        self.unet = unet

    def __call__(self, x: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        return self.unet(x, t, **condition.unet_kwargs(), return_dict=False)[0]

    def reset(self) -> None:
        """Forget anything derived from the UNet's current layers (nothing here)."""


def check_steps_and_output(num_inference_steps: int, output_type: str) -> None:
    """The upper bound on steps is the sampler's (set_timesteps says it)."""
    if not _is_int(num_inference_steps) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer of at least 1, got {num_inference_steps!r}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}; expected one of: {', '.join(OUTPUT_TYPES)}")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _type_name(x) -> str:
    return "None" if x is None else type(x).__name__


def make_generators(n: int, seed=None, generator=None) -> tuple[list[int], list[torch.Generator]]:
    """One seed and one CPU generator per image, so an image never depends on its batch.

    `seed`: an int (image i gets seed + i), a list (one per image) or None (random); `generator`(s) win over it.
    """
    if generator is not None:
        generators = _as_list(generator, n, "generators")
        return [g.initial_seed() for g in generators], generators
    if seed is None:
        seeds = [secrets.randbelow(RANDOM_SEEDS) for _ in range(n)]
    elif isinstance(seed, int):
        seeds = [seed + i for i in range(n)]
    else:
        seeds = _as_list(seed, n, "seeds")
    for s in seeds:
        if not _is_int(s) or not 0 <= s <= MAX_SEED:
            raise ValueError(f"seed must be an integer from 0 to 2**64 - 1 (one per image: seed + i), got {s!r}")
    return seeds, [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def to_output(images: torch.Tensor, output_type: str):
    """(B, 3, H, W) float in [0, 1] → "pt" as is, "numpy" uint8 (B, H, W, 3), or "pil" images."""
    if output_type == "pt":
        return images
    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    if output_type == "numpy":
        return arr
    from PIL import Image

    return [Image.fromarray(a) for a in arr]


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
    elif path.suffix.lower() not in MODEL_SUFFIXES:
        raise ModelError(f"model file {path} has an unknown extension; expected .safetensors or .ckpt")
    else:
        pipe = LatentDiffusionPipeline.from_single_file(path, device=device, precision=precision, **kwargs)
    return optimize_for_inference(pipe, compile=compile) if optimize else pipe


def _read_tokenizer_and_schedule(folder: Path):
    """tokenizer/ (else tokenizer_config.json's settings on the bundled vocabulary) and scheduler/scheduler_config.json
    (else SD's schedule)."""
    tokenizer = text.read_tokenizer(folder)
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
