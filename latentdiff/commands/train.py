"""`latentdiff train` (UNet, full or LoRA) and `latentdiff train-vae`: a config from YAML and flags, then the run."""
from __future__ import annotations

import logging
import sys

from ..data import DataError
from ..errors import TrainingError
from ..files import describe_os_error
from ..training.config import ConfigError, TrainConfig, VAETrainConfig, parse_config


def main(argv: list[str] | None = None) -> int:
    """`latentdiff train`: 0 on success; 2 (one sentence on stderr) on a bad config, flag, dataset or checkpoint,
    before anything is written; 1 (one sentence) when the run fails: the loss became NaN, a disk filled up."""
    from ..training.trainer import train

    return _run(lambda: train(parse_config(TrainConfig, _argv(argv), "latentdiff train")))


def vae_main(argv: list[str] | None = None) -> int:
    """`latentdiff train-vae`: an AutoencoderKL from scratch, saved with its measured scaling_factor."""
    from ..training.vae_trainer import train_vae

    return _run(lambda: train_vae(parse_config(VAETrainConfig, _argv(argv), "latentdiff train-vae")))


def _argv(argv):
    return sys.argv[1:] if argv is None else list(argv)


def _run(job) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("latentdiff").setLevel(logging.INFO)
    try:
        job()
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a file-size limit, a folder that vanished: the path and the cause
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 1
    return 0
