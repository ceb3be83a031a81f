"""AutoencoderKL from scratch (for the shipped default model): reconstruction + β·KL, then scaling_factor.

LDM trains the UNet on z·s with s = 1/std(z) (Rombach et al. 2022, sec. G), so latents have unit
variance and the noise schedule means what it says; we measure std(z) over the data at the end.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from latentdiff.data import CaptionedImageDataset, collate_skip_none, scan_captioned_images
from latentdiff.errors import TrainingError
from latentdiff.files import atomic_dir, writing
from latentdiff.training.config import ConfigError, VAETrainConfig
from latentdiff.training.losses import vae_loss
from latentdiff.training.run import (ShardedEpochSampler, check_weights, load_checkpoint, make_accelerator,
                                     make_loader, make_optimizer, prepare_output_dir, require_readable,
                                     resolve_resume, summary, together, train_loop)
from latentdiff.vae import posterior, sample_posterior


class Autoencoder(nn.Module):
    """Encode → sample z → decode in one forward, so DDP sees the whole graph; returns (x̂, posterior).
    With a frozen encoder, encoding builds no graph."""

    def __init__(self, vae, decoder_only: bool = False):
        super().__init__()
        self.vae = vae
        self.decoder_only = decoder_only
        for module in (vae.encoder, vae.quant_conv) if decoder_only else ():
            if module is not None:
                module.requires_grad_(False)

    def forward(self, x, generator):  # (B, 3, H, W) → (B, 3, H, W)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.decoder_only):
            posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.sample(generator)).sample, posterior


def load_vae(config: VAETrainConfig):
    from diffusers import AutoencoderKL

    if config.vae is not None:
        try:
            return AutoencoderKL.from_pretrained(config.vae, torch_dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load an AutoencoderKL from {config.vae}: {str(e).rstrip('.')}.") from None
    path = Path(config.model_config)
    if path.is_dir() and (path / "vae" / "config.json").is_file():
        path = path / "vae"
    try:
        torch.manual_seed(config.seed)
        return AutoencoderKL.from_config(AutoencoderKL.load_config(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read an AutoencoderKL config from {config.model_config}: {str(e).rstrip('.')}.") from None


def train_vae(config: VAETrainConfig) -> Path:
    """Train, set scaling_factor, save a diffusers AutoencoderKL folder at output_dir/vae."""
    items = scan_captioned_images(config.data, allow_missing_captions=True)  # captions are not used
    accelerator = make_accelerator(config)
    vae = load_vae(config)
    sampler = ShardedEpochSampler(len(items), config.batch_size, config.seed, accelerator.process_index, accelerator.num_processes)
    resume_from = resolve_resume(config)
    device = accelerator.device

    model = Autoencoder(vae, config.decoder_only).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    model, optimizer = accelerator.prepare(model, optimizer)
    out_dir = prepare_output_dir(accelerator, config)
    dataset = CaptionedImageDataset(items, config.resolution, center_crop=config.center_crop,
                                    random_flip=config.random_flip, seed=config.seed)
    require_readable(dataset, config.data)
    start_step = load_checkpoint(accelerator, resume_from, model, optimizer) if resume_from else 0
    sampler.start = start_step * config.gradient_accumulation
    loader = make_loader(dataset, sampler, config.num_workers, collate_skip_none)

    def loss_fn(batch, gen):
        x = batch["pixel_values"].to(device)
        recon, posterior = model(x, gen)
        return vae_loss(recon, x, posterior, config.kl_weight, config.reconstruction, config.worst_weight)[0]

    missing = train_loop(accelerator, config, model, optimizer, params, sampler, loader, start_step, loss_fn,
                         lambda step: None, "train-vae")

    out = out_dir / "vae"

    def save() -> None:
        if not accelerator.is_main_process:
            return
        check_weights(config.max_steps, params, str(out))
        if not config.decoder_only:  # a frozen encoder keeps the latent space its UNet was trained on, scale included
            std = latent_std(vae, dataset, config.scale_samples, config.batch_size, config.seed)
            if not math.isfinite(std) or std <= 0:
                raise TrainingError(f"the latents' std is {std}, so {out} was not written; the VAE has collapsed or "
                                    "diverged — lower --lr or raise --kl-weight.")
            vae.register_to_config(scaling_factor=1.0 / std)
            print(f"latent std {std:.4f} → scaling_factor {1 / std:.5f}")
        with writing(out, "save the VAE to"), atomic_dir(out) as tmp:
            vae.save_pretrained(tmp, safe_serialization=True)
        summary(config, items, missing, out)

    together(accelerator, save)
    accelerator.end_training()  # finishes trackers; ends the process group of a multi-process run
    return out


@torch.no_grad()
def latent_std(vae, dataset, n: int, batch_size: int, seed: int) -> float:
    """std of posterior samples z over (up to) the first n images: the number scaling_factor undoes."""
    vae.eval()
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(min(n, len(dataset)))),
                                         batch_size=batch_size, collate_fn=collate_skip_none)
    latents = [sample_posterior(posterior(vae, b["pixel_values"]), gen).cpu() for b in loader if b is not None]
    return torch.cat(latents).std().item()
