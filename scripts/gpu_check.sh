#!/usr/bin/env bash
# One prepared GPU check (issue 13), under 8 minutes on one H100/H200:
#   1. the GPU and TensorRT tests (pytest -m "gpu or tensorrt": export + plan build + gate, backends vs torch,
#      foreign/corrupt plans, lean plans, prepare() building before streaming, ort-gpu IO binding),
#   2. benchmarks/gpu_host.py (the speed table; its budget is what is left of 7 minutes, hard stop 30 s later),
# then ONE summary table: every test row (passed / failed / skipped with pytest's reason) and every benchmark
# row (seconds, Mvox/s, Dice, or why it was skipped). A host with torch CUDA but without TensorRT or
# onnxruntime-gpu skips those rows with the reason; nothing here installs anything.
#
# Usage: scripts/gpu_check.sh [OUT_DIR]      (default: gpu_check_out; needs `pip install -e ".[test]"` and a CUDA torch)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
START=$(date +%s)
PY=${PYTHON:-python}

echo "== environment" | tee "$OUT/check.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$OUT/check.log"
$PY - <<'PY' 2>&1 | tee -a "$OUT/check.log"
import importlib, torch
print(f"torch {torch.__version__} CUDA {torch.version.cuda} available={torch.cuda.is_available()}")
for name in ("tensorrt", "tensorrt_lean", "onnxruntime"):
    try:
        m = importlib.import_module(name)
        extra = f" providers {m.get_available_providers()}" if name == "onnxruntime" else ""
        print(f"{name} {m.__version__}{extra}")
    except Exception as exc:  # report, never stop: the rows that need it skip with this reason
        print(f"{name}: not usable ({type(exc).__name__}: {exc})")
PY

echo "== GPU and TensorRT tests (limit 270 s)" | tee -a "$OUT/check.log"
timeout 270 $PY -m pytest -q -rA -p no:cacheprovider --timeout 240 --junitxml="$OUT/gpu_tests.xml" \
    -m "gpu or tensorrt" tests/engine/test_trt_backend.py tests/engine/test_ort_backend.py tests/engine/test_backend_contract.py \
    2>&1 | tail -40 | tee -a "$OUT/check.log"
TESTS_RC=${PIPESTATUS[0]}

LEFT=$(( 420 - ($(date +%s) - START) ))
[ "$LEFT" -lt 60 ] && LEFT=60
echo "== benchmarks/gpu_host.py (budget ${LEFT} s)" | tee -a "$OUT/check.log"
timeout $(( LEFT + 30 )) $PY benchmarks/gpu_host.py "$OUT/bench" --budget-s "$LEFT" > "$OUT/bench.md" 2>> "$OUT/check.log"
BENCH_RC=$?

$PY - "$OUT" "$TESTS_RC" "$BENCH_RC" "$START" <<'PY'
import json, sys, time
import xml.etree.ElementTree as ET
from pathlib import Path
out, tests_rc, bench_rc, start = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
rows = []
junit = out / "gpu_tests.xml"
if junit.is_file():
    for case in ET.parse(junit).iter("testcase"):
        name = f"test {case.get('name')}"
        skipped = case.find("skipped")
        failed = case.find("failure") if case.find("failure") is not None else case.find("error")
        if failed is not None:
            rows.append((name, "FAILED", (failed.get("message") or "")[:110]))
        elif skipped is not None:
            rows.append((name, "skipped", (skipped.get("message") or "")[:110]))
        else:
            rows.append((name, "passed", f"{float(case.get('time', 0)):.1f} s"))
else:
    rows.append(("tests", f"no result (exit {tests_rc})", "see check.log"))
results = out / "bench" / "results.json"
if results.is_file():
    for r in json.loads(results.read_text()).get("results", []):
        name = f"bench {r['method']} [{r['size']}]"
        if "skipped" in r:
            rows.append((name, "skipped", str(r["skipped"])[:110]))
        else:
            rows.append((name, "ran", f"{r['seconds']:.2f} s, {r['voxels_per_s'] / 1e6:.1f} Mvox/s, Dice {r.get('dice')}"))
else:
    rows.append(("benchmarks", f"no result (exit {bench_rc})", "see check.log"))
print(f"\n| check | result | detail |  (total {time.time() - start:.0f} s)\n|---|---|---|")
for row in rows:
    print("| " + " | ".join(str(c).replace("|", "/") for c in row) + " |")
PY
[ "$TESTS_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
