"""Training with accelerate: the text-to-image trainer (full or LoRA) and the VAE trainer, sharing run.py.

The command-line front ends are latentdiff.commands.train (`latentdiff train`, `latentdiff train-vae`).
"""
from latentdiff.training.config import ConfigError, TrainConfig, VAETrainConfig, parse_config

__all__ = ["ConfigError", "TrainConfig", "VAETrainConfig", "parse_config"]
