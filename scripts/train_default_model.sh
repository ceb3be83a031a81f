#!/usr/bin/env bash
# Reproduces the shipped default model (latentdiff/default_model) from nothing, on the CPU, exactly as it was made:
#   1. the synthetic shapes dataset, 2. the VAE (800 steps, then resumed to 1400: a warm restart of the cosine
#   schedule), 3. UNet + CLIP text encoder jointly, 4. fp16 copy into the package.
# Every step resumes where a killed run stopped (--resume latest). One thread per run: on 2 shared cores that was faster than two oversubscribed threads.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
latentdiff make-shapes data/shapes --n 20000 --seed 0
latentdiff train-vae --config configs/shapes_vae.yaml --num-workers 0 --resume latest
latentdiff train-vae --config configs/shapes_vae.yaml --num-workers 0 --resume latest --max-steps 1400
latentdiff train --config configs/shapes_unet.yaml --resume latest
python - <<'PY'
import torch
from latentdiff.pipeline import LatentDiffusionPipeline
pipe = LatentDiffusionPipeline.from_pretrained("runs/shapes_unet/model", device="cpu", precision="fp32")
pipe.save_pretrained("latentdiff/default_model", dtype=torch.float16)
PY
