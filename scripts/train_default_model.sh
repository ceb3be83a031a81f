#!/usr/bin/env bash
# Reproduces the shipped default model (latentdiff/default_model, v2.1) from nothing, exactly as it was made:
#   v1: 1. the synthetic shapes dataset, 2. the VAE (800 steps, then resumed to 1400: a warm restart of the cosine
#       schedule), 3. UNet + CLIP text encoder jointly (4000 steps);
#   v2: 4. the VAE's decoder alone, encoder frozen (configs/shapes_vae_decoder.yaml), 5. a second dataset with more
#       triangles, squares and circles, 6. UNet + text encoder go on from step 3 (configs/shapes_unet_v2.yaml);
#   v2.1: 7. the decoder goes on from step 4 on a set with every (color, shape) pair (configs/shapes_vae_decoder_2.yaml),
#       8. UNet + text encoder go on from step 6 with stars twice as often (configs/shapes_unet_v2_1.yaml);
#   9. fp16 copy of step 8's UNet + text encoder with step 7's VAE into the package, with its latentdiff.json: NGMS
#      σ 0.9 on every step, the sampling setting it was judged best with (README, "The shipped default model").
#   scripts/train_default_model.sh [all|v1|v2|v2.1]  (default all; each stage needs the runs/ and data/ of the one before)
# (v2.1 as shipped started from the v2 package upcast to fp32: v2's run folders were on another machine.)
# v1 ran on the 2-core CPU; v2 and v2.1 on one GPU (about 10 and 5 minutes there; the same commands run on a CPU, only
# slower). Every step resumes where a killed run stopped (--resume latest). One thread per run on a CPU: on 2 shared
# cores that was faster than two oversubscribed threads; steps 4 and 6 (7 and 8) are independent and may run side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
stage=${1:-all}
case $stage in all|v1|v2|v2.1) ;; *) echo "usage: $0 [all|v1|v2|v2.1]" >&2; exit 2;; esac
workers=$(nproc)
if [[ $stage == all || $stage == v1 ]]; then
  latentdiff make-shapes data/shapes --n 20000 --seed 0 --workers "$workers"
  latentdiff train-vae --config configs/shapes_vae.yaml --num-workers 0 --resume latest
  latentdiff train-vae --config configs/shapes_vae.yaml --num-workers 0 --resume latest --max-steps 1400
  latentdiff train --config configs/shapes_unet.yaml --resume latest
fi
if [[ $stage == all || $stage == v2 ]]; then
  latentdiff train-vae --config configs/shapes_vae_decoder.yaml --resume latest
  latentdiff make-shapes data/shapes-v2 --n 30000 --seed 1 --shape-weights triangle=2,square=1.5,circle=1.5 \
    --workers "$workers"
  latentdiff train --config configs/shapes_unet_v2.yaml --resume latest
fi
[[ $stage == v1 || $stage == v2 ]] && exit 0
latentdiff make-shapes data/shapes-all --n 30000 --seed 2 --include-holdout --workers "$workers"
latentdiff train-vae --config configs/shapes_vae_decoder_2.yaml --resume latest
latentdiff make-shapes data/shapes-v3 --n 30000 --seed 3 --shape-weights star=2,triangle=1.5 --workers "$workers"
latentdiff train --config configs/shapes_unet_v2_1.yaml --resume latest
python - <<'PY'
import torch
from diffusers import AutoencoderKL
from latentdiff.model_defaults import ModelDefaults
from latentdiff.pipeline import LatentDiffusionPipeline
pipe = LatentDiffusionPipeline.from_pretrained("runs/shapes_unet_v2_1/model", device="cpu", precision="fp32")
pipe.vae = AutoencoderKL.from_pretrained("runs/shapes_vae_decoder_2/vae")
pipe.defaults = ModelDefaults(guidance_min_sigma=0.9, guidance_min_sigma_all_steps=True)
pipe.save_pretrained("latentdiff/default_model", dtype=torch.float16)
PY
