#!/usr/bin/env bash
# One-shot GPU check, for a GPU machine with no network (torch, triton and nvcc preinstalled):
# builds the extension, runs the whole test suite (CUDA-parametrized tests included), runs the CUDA
# tests under compute-sanitizer (memcheck; racecheck for the kernels with shared memory), then the
# op benchmarks in fp32 and bf16 at the RetinaNet and Faster R-CNN shapes, then the training-step benchmark
# (baseline vs LGD, COCO-sized 800x1216 inputs). Everything goes under
# one folder: $OUT if set (the device tool's output folder), else benchmarks/results/gpu-<name>.
# Exit code: the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 | tr ' ' '_')
OUT="${OUT:-benchmarks/results/gpu-${name:-unknown}}"
mkdir -p "$OUT"
failed=0
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, report
  local title=$1
  shift
  local t0=$SECONDS
  if "$@" >"$OUT/$title.log" 2>&1; then
    echo "[gpu_check] ok     $title ($((SECONDS - t0)) s)"
  else
    echo "[gpu_check] FAILED $title ($((SECONDS - t0)) s): tail of $OUT/$title.log"
    tail -n 25 "$OUT/$title.log"
    failed=$((failed + 1))
  fi
}

{ nvidia-smi; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt" | tail -n 1
step build "$PY" -m pip install -v --no-build-isolation --no-deps -e .
step backends "$PY" -c "import lgd_ops; print(lgd_ops.available_backends()); assert 'cuda' in lgd_ops.available_backends()"
step tests "$PY" -m pytest -q tests
if command -v compute-sanitizer >/dev/null; then
  step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" -m pytest -q -x tests -k "cuda and not compile"
  step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 "$PY" -m pytest -q -x tests/test_normalized_mse.py -k cuda
else
  echo "[gpu_check] compute-sanitizer not found: memcheck/racecheck skipped"
fi
for shape in retinanet faster_rcnn; do
  for dtype in float32 bfloat16; do
    step "bench_${shape}_${dtype}" "$PY" benchmarks/bench_ops.py --device cuda --shape "$shape" --dtype "$dtype" --out "$OUT"
  done
done
step bench_train "$PY" benchmarks/bench_train.py --device cuda --image 800 1216 --iters 5 --out "$OUT"
echo "[gpu_check] results in $OUT; $failed step(s) failed"
exit "$failed"
