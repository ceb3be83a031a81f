"""Text-to-image training with accelerate: fine-tune (full or LoRA) or train from component configs.

    image ─VAE enc (or latent cache)─> x_0 · scaling_factor ──┐  t ~ U{0..T−1}, ε ~ N(0, I)
    caption ─(dropout → "")─> ids ─text encoder─> context ────┤  x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε
                                                                └─> UNet(x_t, t, context) ≈ ε or v

SDXL (Podell et al. 2023) trains the same way, conditioned as inference conditions it (conditioning.py): both
encoders' penultimate hidden states, bigG's pooled projection, and time ids from each image's original size and
crop (the dataset's `original_size`, `crop_top_left`) with the training resolution as target size.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from latentdiff import text
from latentdiff.conditioning import Condition, SizeConditioning, join_encoders
from latentdiff.config import DEFAULTS
from latentdiff.data import (CachedLatentDataset, CaptionedImageDataset, LatentCache, collate_skip_none,
                             scan_captioned_images)
from latentdiff.files import writing
from latentdiff.guidance import drop_captions
from latentdiff.schedulers import get_sampler, schedules
from latentdiff.training import lora
from latentdiff.training.config import ConfigError, TrainConfig
from latentdiff.training.ema import EMA
from latentdiff.training.losses import diffusion_loss, offset_noise
from latentdiff.training.run import (ShardedEpochSampler, check_weights, load_checkpoint, make_accelerator,
                                     make_loader, make_optimizer, prepare_output_dir, require_readable,
                                     resolve_resume, summary, together, train_loop)
from latentdiff.training.validation import validation_grid
from latentdiff.vae import to_latents

logger = logging.getLogger(__name__)


class Denoiser(nn.Module):
    """Text encoder(s) + UNet as one module: one DDP wrapper, one accumulate context, one checkpointed model."""

    def __init__(self, unet, text_encoder, text_encoder_2=None):
        super().__init__()
        # None (SD 1.x/2.x) registers no submodule: their checkpoints keep their keys
        self.unet, self.text_encoder, self.text_encoder_2 = unet, text_encoder, text_encoder_2

    def forward(self, x_t, t, input_ids, time_ids=None):
        # (B, C, h, w), (B,), [(B, 77) per text encoder], SDXL's (B, 6) → (B, C, h, w)
        return self.unet(x_t, t, **self.condition(input_ids, time_ids).unet_kwargs()).sample

    def condition(self, input_ids, time_ids) -> Condition:
        """What inference makes of a one-chunk prompt: SD 1.x/2.x the context (B, 77, D); SDXL both encoders'
        penultimate hidden states side by side (B, 77, 2048), bigG's pooled projection, and the time ids."""
        if self.text_encoder_2 is None:
            return Condition(text.encode(self.text_encoder, input_ids[0]))
        encoders = (self.text_encoder, self.text_encoder_2)
        return Condition(*join_encoders([text.encode_sdxl(e, ids) for e, ids in zip(encoders, input_ids)]), time_ids)


def past_the_context(text_encoder) -> list[nn.Module]:
    """SDXL's CLIP-L after the penultimate hidden state the context is read from (its last layer and final layer
    norm): they never reach the loss, so they get no gradient, which DDP would wait for."""
    inner = getattr(text_encoder, "text_model", text_encoder)
    return [inner.encoder.layers[-1], inner.final_layer_norm]


def time_ids(batch, resolution: int) -> torch.Tensor:
    """SDXL's (B, 6) time ids of a batch, as diffusers' SDXL training scripts make them: each image's original size
    (height, width) and crop (top, left), then the target size (resolution, resolution)."""
    target = (resolution, resolution)
    return torch.tensor([SizeConditioning(tuple(o), tuple(c), target).time_ids(*target)[0]
                         for o, c in zip(batch["original_size"].tolist(), batch["crop_top_left"].tolist())])


def load_model(config: TrainConfig):
    """The starting pipeline on the CPU in float32: pretrained, or random from component configs."""
    from diffusers import AutoencoderKL

    from latentdiff.pipeline import LatentDiffusionPipeline, load_pipeline

    source = config.model or config.model_config
    try:
        if config.model is not None:
            pipe = load_pipeline(config.model, device="cpu", precision="fp32", optimize=False)
        else:
            pipe = LatentDiffusionPipeline.from_config(config.model_config, seed=config.seed)
        if config.vae is not None:
            pipe.vae = AutoencoderKL.from_pretrained(config.vae)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"cannot load the model from {source}: {str(e).rstrip('.')}.") from None
    if config.prediction_type is not None:
        pipe.schedule = dataclasses.replace(pipe.schedule, prediction_type=config.prediction_type)
    return pipe


def check_validation_steps(pipe, steps: int) -> None:
    """ConfigError unless the validation sampler can take `steps` on this model's schedule (before any work:
    otherwise the run would train to the end and fail at its first grid)."""
    most = get_sampler(DEFAULTS.sampler, pipe.schedule).max_steps
    if steps <= most:
        return
    raise ConfigError(f"validation_steps {steps} is more than the {DEFAULTS.sampler} sampler takes on this model's "
                      f"schedule ({pipe.schedule.num_train_timesteps} training timesteps, steps_offset "
                      f"{pipe.schedule.steps_offset}); use at most {most}.")


def train(config: TrainConfig) -> Path:
    """Run (or resume) one training; returns the saved model folder (or LoRA file)."""
    # 1. Everything that can fail on bad input, before anything is written
    items = scan_captioned_images(config.data, allow_missing_captions=config.allow_missing_captions)
    accelerator = make_accelerator(config)
    pipe = load_model(config)
    if config.validation_prompts:
        check_validation_steps(pipe, config.validation_steps)
    sampler = ShardedEpochSampler(len(items), config.batch_size, config.seed, accelerator.process_index, accelerator.num_processes)
    resume_from = resolve_resume(config)
    device = accelerator.device

    # 2. Models: what is trained gets gradients; the VAE is always frozen. Text encoders: SDXL's two, both trained
    unet, vae, text_encoders = pipe.unet, pipe.vae, pipe.named_text_encoders
    for m in (unet, vae, *text_encoders.values()):
        m.requires_grad_(False).eval()
    if config.lora_rank:
        lora.add_lora(unet, text_encoders.values() if config.lora_text_encoder else [], config.lora_rank, config.lora_alpha,
                      seed=config.seed)
    else:
        unet.requires_grad_(True)
        for encoder in text_encoders.values():
            encoder.requires_grad_(config.train_text_encoder)
    if pipe.is_sdxl:
        for m in past_the_context(pipe.text_encoder):
            m.requires_grad_(False)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder or config.lora_text_encoder:
            for encoder in text_encoders.values():
                encoder.gradient_checkpointing_enable()
    model = Denoiser(unet, *text_encoders.values()).train()
    vae.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMA(params, config.ema_decay) if config.ema_decay else None  # checkpointed by save_checkpoint itself

    # 3. Data: cached VAE posteriors, or pixels encoded on the fly
    out_dir = prepare_output_dir(accelerator, config)
    if config.cache_latents:
        cache = LatentCache(out_dir / "latent_cache", vae, config.resolution, config.center_crop, config.random_flip)
        with accelerator.main_process_first():  # the main process encodes; the others then find every entry
            with writing(cache.cache_dir, "write the latent cache in"):
                cache.build(items, config.batch_size, progress=accelerator.is_main_process)
        dataset = CachedLatentDataset(cache, items, seed=config.seed)
    else:
        dataset = CaptionedImageDataset(items, config.resolution, center_crop=config.center_crop,
                                        random_flip=config.random_flip, seed=config.seed)
    require_readable(dataset, config.data)
    start_step = load_checkpoint(accelerator, resume_from, model, optimizer, ema) if resume_from else 0
    if resume_from:
        logger.info("resumed from %s at step %d", resume_from, start_step)
    sampler.start = start_step * config.gradient_accumulation
    loader = make_loader(dataset, sampler, config.num_workers, collate_skip_none)

    # 4. The objective
    alphas_cumprod = schedules.alphas_cumprod(pipe.schedule).to(device)  # ᾱ_t, (T,)
    T = pipe.schedule.num_train_timesteps

    def loss_fn(batch, gen: torch.Generator) -> torch.Tensor:
        with torch.no_grad():  # scaled latents x_0 (B, C, h, w), a posterior sample
            if "latent_dist" in batch:
                x0 = to_latents(vae, batch["latent_dist"], gen)
            else:
                x0 = pipe.encode(batch["pixel_values"], gen)
            x0 = x0.to(device, torch.float32)
        noise = offset_noise(tuple(x0.shape), config.noise_offset, gen).to(device)
        t = torch.randint(0, T, (x0.shape[0],), generator=gen).to(device)
        x_t = schedules.add_noise(x0, noise, t, alphas_cumprod)
        captions = drop_captions(batch["text"], config.caption_dropout, gen)  # "" encoded as any caption (diffusers)
        ids = [text.tokenize(tokenizer, captions).to(device) for tokenizer in pipe.conditioner.tokenizers]
        pred = model(x_t, t, ids, time_ids(batch, config.resolution).to(device) if pipe.is_sdxl else None)
        return diffusion_loss(pred, x0, noise, t, alphas_cumprod, pipe.schedule.prediction_type, config.snr_gamma)

    def validate(step: int) -> None:
        if not config.validation_prompts or not accelerator.is_main_process:
            return
        model.eval()
        grid = out_dir / "validation" / f"step-{step:06d}.png"
        with (ema.swapped() if ema else contextlib.nullcontext()), accelerator.autocast(), writing(grid, "write the validation grid"):
            validation_grid(pipe, config.validation_prompts, config.validation_seeds, config.validation_steps,
                            config.validation_guidance, grid)
        model.train()

    def on_step(step: int) -> None:
        if ema is not None:
            ema.update()
        if config.validation_every and step % config.validation_every == 0 and step < config.max_steps:
            together(accelerator, lambda: validate(step))

    # 5. Train
    missing = train_loop(accelerator, config, model, optimizer, params, sampler, loader, start_step, loss_fn, on_step,
                         "train", ema=ema)

    # 6. Save: the EMA weights when kept, as a diffusers folder (or a LoRA file); never NaN weights
    out = out_dir / ("pytorch_lora_weights.safetensors" if config.lora_rank else "model")
    lora_encoders = text_encoders if config.lora_text_encoder else {}

    def save() -> None:
        if not accelerator.is_main_process:
            return
        if ema is not None:
            ema.copy_to_model()
        check_weights(config.max_steps, params, str(out))
        validate(config.max_steps)
        with writing(out, "save the model to"):
            if config.lora_rank:
                lora.save_lora(out, unet, lora_encoders)
            else:
                pipe.save_pretrained(out)
        if config.export_single_file and config.lora_rank:  # the LoRA's "single file": kohya's layout
            from latentdiff.checkpoints.single_file import model_family

            single = out_dir / "lora.safetensors"
            with writing(single, "save the LoRA to"):
                lora.save_kohya(single, unet, lora_encoders, model_family(*pipe.text_encoders))
        elif config.export_single_file:
            from latentdiff.checkpoints import save_single_file

            single = out_dir / "model.safetensors"
            with writing(single, "save the model to"):
                save_single_file(single, unet, vae, pipe.text_encoder, text_encoder_2=pipe.text_encoder_2,
                                 schedule=pipe.schedule)
        summary(config, items, missing, out)

    together(accelerator, save)
    accelerator.end_training()  # finishes trackers; ends the process group of a multi-process run
    return out
