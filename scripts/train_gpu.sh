#!/usr/bin/env bash
# One prepared training run on a GPU host (issue 10): the generalist fine-tune continued from the shipped
# weights with the GPU doing the steps and the host's cores making the training volumes ahead of them.
# Bounded by wall clock (--time-limit: the learning rate decays over it), so it fits one device call;
# the checkpoint is written every 200 steps and at the end, then the bundle (weights + bundle.json).
#
# Usage: scripts/train_gpu.sh [OUT_DIR] [SECONDS]   (default: train_gpu_out, 420 s of training)
# Environment (defaults in brackets): LR [1e-3], BATCH [8], POOL [96], WORKERS [cores - 2], DEVICE [cuda],
# INIT [engine/default_bundle/model.pt], DATA [--p-tissue 0.7] (the data options, e.g.
# DATA="--p-tissue 0.8 --tissue-diameter 5 30 --p-engine-zoom 0.5"); two runs can share one GPU with
# WORKERS splitting the cores.
# Needs the project's dependencies and a CUDA torch. Afterwards, on any machine:
#   cellseg3d export OUT_DIR/bundle                               (its ONNX files, from the new weights)
#   python -m training.tune_postprocess --bundle OUT_DIR/bundle
#   python -m training.evaluate --bundle OUT_DIR/bundle          (the stress matrix; ship only if it is better)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-train_gpu_out}
SECONDS_LIMIT=${2:-420}
PY=${PYTHON:-python}
mkdir -p "$OUT"
WORKERS=${WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
INIT=${INIT:-engine/default_bundle/model.pt}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$OUT/train.log" || true
mkdir -p "$OUT/bundle"  # the new bundle inherits the shipped one's post-processing, patch and validation facts
cp engine/default_bundle/bundle.json engine/default_bundle/model.pt "$OUT/bundle/"
$PY -m training.train_default --device "${DEVICE:-cuda}" --workers "$WORKERS" --threads 2 \
    --init "$INIT" --checkpoint "$OUT/generalist_gpu.pt" --bundle-out "$OUT/bundle" \
    --steps 100000 --time-limit "$SECONDS_LIMIT" --batch-size "${BATCH:-8}" --pool-size "${POOL:-96}" --lr "${LR:-1e-3}" ${DATA:---p-tissue 0.7} \
    --log-every 50 --save-every 200 2>&1 | tee -a "$OUT/train.log"
