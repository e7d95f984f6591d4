#!/usr/bin/env bash
# One prepared GPU run of the identity-trained prior (about 15 minutes of GPU time with start-up):
# continue the embedded prior with the identity term at GPU batch size, refit the layers, export,
# and judge on a subsample of LFW folds 5-8 with the guards. Needs the CUDA build of torch and the
# training data under $DATA (the UTKFace and LFW folders with their train/eval lists).
# Work folder state is resumable: copy $WORK off the machine before it goes.
set -euo pipefail
DATA=${DATA:-../shared/data}
WORK=${WORK:-runs/id-gpu}
MINUTES=${MINUTES:-8}
# the CPU candidate at --id-weight 1.0 without the adversarial term gained identity but painted blotches
# (MODEL_CARD.md, "Identity-trained candidate"): a lighter identity term and the discriminator back on
ID_WEIGHT=${ID_WEIGHT:-0.3}
ADV_WEIGHT=${ADV_WEIGHT:-0.02}
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
facetier train prior --work "$WORK" --device cuda --batch-size 32 --id-weight "$ID_WEIGHT" --adv-weight "$ADV_WEIGHT" --minutes "$MINUTES" \
  --init-from-bundle codec/assets/facetier-prior-128.safetensors \
  --lists "$DATA/utkface/train_images.txt" "$DATA/lfw/train_images.txt"
facetier train entropy --work "$WORK" --device cuda --out "$WORK/linear.safetensors" \
  --lists "$DATA/utkface/train_images.txt" "$DATA/lfw/train_images.txt"
facetier train semantic --work "$WORK" --device cuda --from-bundle "$WORK/linear.safetensors" --out "$WORK/candidate.safetensors" \
  --codec-id facetier-prior-128-gpu-candidate --lists "$DATA/utkface/train_images.txt" "$DATA/lfw/train_images.txt"
facetier eval-lfw --lfw "$DATA/lfw" --weights "$WORK/candidate.safetensors" --max-pairs-per-fold 100 \
  --report "$WORK/eval-lfw.json" --gallery "$WORK/eval-lfw.png"
