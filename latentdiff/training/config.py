"""Training configs: flat typed dataclasses, read from YAML, every field also a command-line flag.

A run is described by one config; flags override the YAML (`--batch-size 8` sets `batch_size`).
Any mistake is a `ConfigError` with one sentence, raised before anything is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad config file, flag or value; the message is one sentence for the user."""


MAX_SEED = 2**32 - 1  # as latentdiff.pipeline.MAX_SEED: seeds are 32-bit everywhere in latentdiff


@dataclass
class RunConfig:
    """What every training run has: data, output, optimiser, precision, checkpoints, logging."""

    # data
    data: str | None = None  # imagefolder with metadata.jsonl, or images with .txt/.caption sidecars
    allow_missing_captions: bool = False  # an image without a caption gets "" instead of an error
    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = False
    num_workers: int = 2
    # output
    output_dir: str | None = None
    # optimisation: AdamW, linear warmup then cosine or constant
    batch_size: int = 4  # per process
    gradient_accumulation: int = 1
    max_steps: int = 1000  # optimiser steps
    lr: float = 1e-4
    lr_schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # 0 = no clipping
    # system
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 0
    # checkpoints: accelerate save_state into output_dir/checkpoints/ckpt-XXXXXX
    checkpoint_every: int = 500  # 0 = only at the end
    keep_checkpoints: int = 3
    resume: str | None = None  # a checkpoint folder, or "latest"
    log_every: int = 10
    log_indices: bool = False  # each process appends the dataset indices it consumed to data-rank{r}.jsonl

    def validate(self) -> None:
        """Checks that need no file reads beyond existence; raises ConfigError."""
        _check_finite(self)
        if self.data is None:
            raise ConfigError("no dataset given; pass --data DIR or set `data:` in the config.")
        if not Path(self.data).is_dir():
            raise ConfigError(f"dataset folder {self.data} does not exist or is not a folder.")
        if self.output_dir is None:
            raise ConfigError("no output folder given; pass --output-dir DIR or set `output_dir:` in the config.")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ConfigError(f"output_dir {self.output_dir} is a file, not a folder.")
        positive = ("resolution", "batch_size", "gradient_accumulation", "max_steps", "keep_checkpoints", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("num_workers", "warmup_steps", "checkpoint_every", "max_grad_norm", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}.")
        if self.resolution % 8:
            raise ConfigError(f"resolution must be a multiple of 8, got {self.resolution}.")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be between 0 and 1, got {self.min_lr_ratio}.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}.")
        if not self.adam_epsilon > 0:
            raise ConfigError(f"adam_epsilon must be positive, got {self.adam_epsilon}.")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed must be between 0 and {MAX_SEED}, got {self.seed}.")
        _one_of("lr_schedule", self.lr_schedule, ("cosine", "constant"))
        _one_of("mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        if self.resume not in (None, "latest") and not Path(self.resume).is_dir():
            raise ConfigError(f"--resume {self.resume}: no such checkpoint folder (give a ckpt-XXXXXX folder or 'latest').")


@dataclass
class TrainConfig(RunConfig):
    """Text-to-image UNet training: fine-tune (full or LoRA) or from scratch."""

    # model: exactly one of `model` (pretrained folder / single file) or `model_config` (from scratch)
    model: str | None = None
    model_config: str | None = None  # folder of component configs: unet/, vae/, text_encoder/, scheduler/
    vae: str | None = None  # a trained AutoencoderKL folder that replaces the model's VAE
    # objective
    prediction_type: str | None = None  # epsilon | v_prediction; None = the model's scheduler config
    snr_gamma: float = 5.0  # Min-SNR-γ weighting (Hang et al. 2023); 0 = plain MSE
    noise_offset: float = 0.0  # Guttenberg 2023; ~0.05 helps very dark/bright images
    caption_dropout: float = 0.1  # the rate captions become "" so the model learns the CFG unconditional
    # what is trained
    train_text_encoder: bool = False  # SDXL: both text encoders
    lora_rank: int = 0  # 0 = full fine-tune
    lora_alpha: float | None = None  # None = rank (scale 1)
    lora_text_encoder: bool = False  # adapters on the text encoder too (SDXL: on both)
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0  # 0 = no EMA; the saved model holds the EMA weights when on
    cache_latents: bool = True  # encode every image once with the VAE; training skips the encoder
    # validation: grids of fixed-seed samples every N steps
    validation_prompts: list[str] = field(default_factory=list)
    validation_every: int = 0  # 0 = only at the end (when prompts are given)
    validation_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    validation_steps: int = 25
    validation_guidance: float = 5.0
    # export
    export_single_file: bool = False  # also write model.safetensors in the original SD layout (a LoRA run: lora.safetensors, kohya's layout)

    def validate(self) -> None:
        super().validate()
        if (self.model is None) == (self.model_config is None):
            raise ConfigError("give exactly one of --model (a pretrained folder or file) or --model-config (component configs, from scratch).")
        for name in ("model", "vae"):
            if getattr(self, name) is not None and not Path(getattr(self, name)).exists():
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} does not exist.")
        if self.model_config is not None and not Path(self.model_config).is_dir():
            raise ConfigError(f"--model-config {self.model_config} is not a folder of component configs.")
        if self.prediction_type is not None:
            _one_of("prediction_type", self.prediction_type, ("epsilon", "v_prediction"))
        if not 0 <= self.caption_dropout <= 1:
            raise ConfigError(f"caption_dropout must be between 0 and 1, got {self.caption_dropout}.")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}.")
        for name in ("snr_gamma", "noise_offset", "lora_rank", "validation_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}.")
        if self.validation_steps < 1:
            raise ConfigError(f"validation_steps must be at least 1, got {self.validation_steps}.")
        if self.validation_prompts and not self.validation_seeds:
            raise ConfigError("validation_prompts are given but validation_seeds is empty; give at least one seed.")
        for s in self.validation_seeds:
            if not 0 <= s <= MAX_SEED:
                raise ConfigError(f"validation_seeds must be between 0 and {MAX_SEED}, got {s}.")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha must be positive, got {self.lora_alpha}.")
        if (self.lora_text_encoder or self.lora_alpha is not None) and self.lora_rank == 0:
            raise ConfigError("LoRA options are set but lora_rank is 0; set --lora-rank to train LoRA adapters.")
        if self.cache_latents and not self.center_crop:
            raise ConfigError("latent caching needs center_crop (a random crop differs every epoch); pass --no-cache-latents.")
        if self.lora_rank and self.train_text_encoder:
            raise ConfigError("train_text_encoder fully fine-tunes the text encoder and cannot be combined with LoRA; use --lora-text-encoder.")


@dataclass
class VAETrainConfig(RunConfig):
    """AutoencoderKL from scratch: reconstruction + β·KL (Kingma & Welling 2014; β small as in LDM)."""

    model_config: str | None = None  # an AutoencoderKL config.json, or a folder holding vae/config.json
    vae: str | None = None  # a trained AutoencoderKL folder to go on from, instead of model_config's random init
    # Fine-tune only the decoder (+ post_quant_conv) of `vae`: the encoder, so the latent space and scaling_factor,
    # stay as they are and a UNet trained on them keeps working (as SD's ft-MSE VAE decoder).
    decoder_only: bool = False
    reconstruction: str = "l1"  # l1 | l2
    worst_weight: float = 0.0  # weight of the mean error of each image's worst 1 % of pixels (losses.vae_loss)
    kl_weight: float = 1e-6
    scale_samples: int = 512  # images encoded at the end to set scaling_factor = 1/std(latents)

    def validate(self) -> None:
        super().validate()
        if (self.model_config is None) == (self.vae is None):
            raise ConfigError("give exactly one of --model-config (a config.json or a folder with vae/config.json: from "
                              "scratch) or --vae (a trained AutoencoderKL folder to go on from).")
        for name in ("model_config", "vae"):
            if getattr(self, name) is not None and not Path(getattr(self, name)).exists():
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} does not exist.")
        if self.decoder_only and self.vae is None:
            raise ConfigError("--decoder-only fine-tunes the decoder of a trained VAE; give that VAE with --vae.")
        _one_of("reconstruction", self.reconstruction, ("l1", "l2"))
        for name in ("kl_weight", "worst_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}.")
        if self.scale_samples < 1:
            raise ConfigError(f"scale_samples must be at least 1, got {self.scale_samples}.")


def _check_finite(config: RunConfig) -> None:
    """Every float option must be a number: argparse and YAML both accept nan and inf (and 1e999 = inf), which
    would pass every range check below (nan < 0 is False) and turn up as NaN weights at the end of the run."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        base, is_list = _flag_type(hints[f.name])
        if base is not float:
            continue
        value = getattr(config, f.name)
        for v in (value if is_list else [value]) if value is not None else []:
            if isinstance(v, (int, float)) and not math.isfinite(v):
                raise ConfigError(f"{f.name} must be a finite number, got {v}.")


def _one_of(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} {value!r} is not supported; expected one of: {', '.join(allowed)}.")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit; we want one sentence and exit 2
        raise ConfigError(message + ("" if message.endswith(".") else "."))


def _flag_type(hint):
    """(base type, is_list) of a field annotation such as `int`, `str | None`, `list[str]`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return _flag_type(args[0])
    if typing.get_origin(hint) is list:
        return args[0], True
    return hint, False


def parse_config(cls: type[RunConfig], argv: list[str], prog: str) -> RunConfig:
    """YAML from --config (optional), then flags on top; the result is validated."""
    hints = typing.get_type_hints(cls)
    parser = _Parser(prog=prog, description=cls.__doc__, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file with any of the options below")
    for f in dataclasses.fields(cls):
        base, is_list = _flag_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(flag, type=base, nargs="*" if is_list else None, metavar=base.__name__.upper())
    args = vars(parser.parse_args(argv))
    values = load_yaml(cls, args.pop("config")) if "config" in args else {}
    values.update(args)
    config = cls(**values)
    config.validate()
    return config


def load_yaml(cls: type[RunConfig], path: str) -> dict:
    """The YAML mapping, with unknown keys and wrongly typed values refused."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}.") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must be a mapping of option: value.")
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        if key not in hints:
            raise ConfigError(f"unknown option {key!r} in {path}; known options: {', '.join(hints)}.")
        if not _matches(hints[key], value):
            raise ConfigError(f"option {key!r} in {path} should be {_describe(hints[key])}, got {value!r}.")
    return {k: (float(v) if _flag_type(hints[k])[0] is float and isinstance(v, int) else v) for k, v in raw.items()}


def _matches(hint, value) -> bool:
    base, is_list = _flag_type(hint)
    nullable = type(None) in typing.get_args(hint)
    if value is None:
        return nullable
    if is_list:
        return isinstance(value, list) and all(_matches(base, v) for v in value)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, base)


def _describe(hint) -> str:
    base, is_list = _flag_type(hint)
    return f"a list of {base.__name__}" if is_list else f"a {base.__name__}"
