"""Train a latentdiff model: `python scripts/train.py --config configs/shapes_unet.yaml [--flag value …]`.

Also `accelerate launch --num_processes N scripts/train.py …`; `vae` as the first argument trains a VAE instead.
"""
import sys

from latentdiff.commands.train import main, vae_main

if __name__ == "__main__":
    if sys.argv[1:2] == ["vae"]:
        sys.exit(vae_main(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
