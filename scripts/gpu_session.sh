#!/usr/bin/env bash
# One prepared device call on a lent GPU host (issues 10 and 11), about 7 minutes:
#   - two generalist training runs side by side on the one GPU (scripts/train_gpu.sh; lr 5e-4, batches of
#     16, each with a third of the cores making volumes), continued from the shipped weights (stage 6): one
#     on stage 6's data (the control: more steps alone; 70% tissue volumes, 10% empty fields of camera
#     noise), one on wider data (small cells drawn from 5 voxels and zoomed into the model's range as the
#     engine does; cell sizes spread up to 0.8, walls bent up to 0.6, staining patchiness up to 1, the
#     ranges `python -m training.evaluate --probe` scores past; 80% tissue volumes, 5% empty fields); which one ships
#     (if either) is decided afterwards on the validation volumes, not here;
#   - meanwhile: the CUDA equality test of the torch labelling steps, the device labelling benchmark
#     (benchmarks/labels_device.py), the cost of --tta and the GPU-marked backend tests;
#   - everything packed into OUT_DIR/results.tar.gz (checkpoints, bundles, logs) plus the logs beside it.
#
# Usage: scripts/gpu_session.sh [OUT_DIR] [TRAIN_SECONDS]   (default: gpu_out, 330)
# Needs a CUDA torch, edt, cc3d, fastremap and onnxconverter-common (the backend tests export; the lent H200 lacked all
# of them: carry them as wheels); nothing is installed here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_out}
SECS=${2:-330}
WORK=${WORK:-/tmp/gpu_session}
mkdir -p "$OUT" "$WORK"
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1
third=$(( $(nproc) / 3 > 1 ? $(nproc) / 3 : 1 ))
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/env.log" 2>&1
lscpu | grep -E 'Model name|^CPU\(s\)' >> "$OUT/env.log"

LR=5e-4 BATCH=16 POOL=64 WORKERS=$third DATA="--p-tissue 0.7 --p-empty 0.1" scripts/train_gpu.sh "$WORK/control" "$SECS" > "$WORK/a.log" 2>&1 &
A=$!
LR=5e-4 BATCH=16 POOL=64 WORKERS=$third DATA="--p-tissue 0.8 --tissue-diameter 5 30 --p-engine-zoom 0.5 --p-empty 0.05 \
    --tissue-size-spread 0 0.8 --tissue-warp 0 0.6 --tissue-patchiness 0 1" \
    scripts/train_gpu.sh "$WORK/wide" "$SECS" > "$WORK/b.log" 2>&1 &
B=$!

{
  echo "== CUDA equality of the torch labelling steps"
  timeout 150 $PY -m pytest -q -p no:cacheprovider -rA tests/engine/test_labels_device.py tests/engine/test_labels.py -k cuda 2>&1 | tail -5
  echo "== device labelling benchmark"
  timeout 200 $PY -m benchmarks.labels_device --device cuda --shape 64,512,512 --json "$OUT/labels_device.json" 2>&1
  echo "== labelling on the GPU end to end (the window's array steps there since the device window; F1 in the summary)"
  $PY -m engine.cli sample "$WORK/big.tif" --shape 128,512,512 --seed 5 > /dev/null 2>&1
  timeout 120 $PY -m engine.cli segment "$WORK/big.tif" -o "$WORK/big_labels.tif" --backend torch-cuda --report "$OUT/big_report.json" --no-progress 2>&1 | tail -1
  echo "== --tta cost on the GPU (torch-cuda, a 128x512x512 sample; the summary lines give the times)"
  $PY -m engine.cli sample "$WORK/tta.tif" --shape 128,512,512 --seed 5 > /dev/null 2>&1
  for flag in "" --tta; do
    timeout 120 $PY -m engine.cli segment "$WORK/tta.tif" -o "$WORK/tta_labels$flag.tif" --backend torch-cuda $flag --no-progress 2>&1 | tail -1
  done
  echo "== GPU-marked backend tests"
  timeout 120 $PY -m pytest -q -p no:cacheprovider -rA -m "gpu or tensorrt" tests/engine/test_ort_backend.py \
      tests/engine/test_backend_contract.py tests/engine/test_trt_backend.py 2>&1 | tail -25
} > "$OUT/checks.log" 2>&1

wait $A; RA=$?
wait $B; RB=$?
echo "training exits: control $RA, wide data $RB" >> "$OUT/checks.log"
tail -n 4 "$WORK/a.log" "$WORK/b.log" >> "$OUT/checks.log"
cp "$WORK/a.log" "$OUT/train_control.log"; cp "$WORK/b.log" "$OUT/train_wide.log"
tar -C "$WORK" -czf "$OUT/results.tar.gz" control wide
cat "$OUT/env.log" "$OUT/checks.log"
