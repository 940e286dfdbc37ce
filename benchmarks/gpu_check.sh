#!/usr/bin/env bash
# One-shot GPU check for the GPU machine (python3 with torch, triton and nvcc preinstalled; no network; maybe no
# detectron2 or pycocotools: the tests needing them skip themselves, and the training benchmark is skipped):
#   build        lgd_ops._C in place for sm_90 (setup.py build_ext --inplace: no pip, no network)
#   tests        the tests of the CUDA and Triton parametrizations (-k "cuda or triton"; CI runs the rest on CPU),
#                with pytest-xdist when available
#   bench_ops_*  the op benchmarks at the RetinaNet and Faster R-CNN shapes, fp32 NCHW then bf16 channels_last
#   memcheck     compute-sanitizer memcheck on a few CUDA and Triton forward/backward tests
#   racecheck    compute-sanitizer racecheck on the normalized_mse CUDA tests (its kernel uses shared memory)
#   bench_train  the training-step benchmark, only where lgd (so detectron2) imports
# The steps run in that order, the numbers the issue needs (tests, benchmarks) before the sanitizers, since a
# slow build or test step leaves the last steps no time.
# Every command runs under `timeout`; a step's limit is its budget, capped by what is left of GPU_CHECK_SECONDS
# (default 440) counted from the start, so that with the final packing the script ends within 8 minutes.
# Results: $OUT if set (the device tool's output folder, which returns at most 8 files), else
# benchmarks/results/gpu-<name>: summary.txt (steps, benchmark tables), the benchmark CSVs and results.tar.gz
# (every log and output). Exit code: the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
now() { date +%s; }
deadline=$(($(now) + ${GPU_CHECK_SECONDS:-440}))
PY="${PYTHON:-python3}"
export PATH="$(dirname "$(command -v "$PY")"):$PATH"  # ninja from the same environment
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"    # the in-place build, for tests and benchmarks
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" FORCE_CUDA=1 PYTHONUNBUFFERED=1
name=$(timeout -k 5 15 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 | tr ' ' '_')
OUT="${OUT:-benchmarks/results/gpu-${name:-unknown}}"
WORK=$(mktemp -d)  # logs and raw outputs, packed into $OUT/results.tar.gz at the end
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
failed=0

say() { echo "[gpu_check] $*" | tee -a "$WORK/summary.txt"; }
step() {  # step NAME BUDGET COMMAND...: run under timeout, log to $WORK/NAME.log, report
  local title=$1 budget=$2 left=$((deadline - $(now) - 5))  # 5 s: timeout -k, for a command ignoring SIGTERM
  shift 2
  local limit=$((budget < left ? budget : left)) t0 rc=0
  if [ "$limit" -lt 10 ]; then
    say "skipped $title: no time left"
    return
  fi
  echo "[gpu_check] $title: limit ${limit} s"
  t0=$(now)
  timeout -k 5 "$limit" "$@" >"$WORK/$title.log" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ]; then
    say "ok      $title ($(($(now) - t0)) s)"
  elif grep -q "Device not supported" "$WORK/$title.log"; then
    say "skipped $title: compute-sanitizer does not support this device"
  else
    [ "$rc" -eq 124 ] && rc="timed out after ${limit} s" || rc="exit $rc"
    say "FAILED  $title ($rc, $(($(now) - t0)) s): tail of $title.log"
    tail -n 25 "$WORK/$title.log" | tee -a "$WORK/summary.txt"
    failed=$((failed + 1))
  fi
}

xdist=()
timeout -k 5 15 "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
has_lgd=0
timeout -k 5 30 "$PY" -c "import lgd" 2>/dev/null && has_lgd=1
versions="import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name())"
step device 30 bash -c 'nvidia-smi; nvcc --version; "$0" -c "$1"' "$PY" "$versions"
tail -n 1 "$WORK/device.log" 2>/dev/null | tee -a "$WORK/summary.txt"
step build 180 "$PY" setup.py build_ext --inplace
step backends 30 "$PY" -c "import lgd_ops; b = lgd_ops.available_backends(); print(b); assert 'cuda' in b"
step tests 150 "$PY" -m pytest -q -p no:cacheprovider "${xdist[@]}" -k "cuda or triton" tests
# fp32 NCHW (the default path) and bf16 channels_last (the fast training path's maps)
for case in "float32 contiguous" "bfloat16 channels_last"; do
  set -- $case
  step "bench_ops_$1" 80 "$PY" benchmarks/bench_ops.py --device cuda --shape retinanet faster_rcnn \
    --dtype "$1" --layout "$2" --objects 7 100 --out "$WORK"
done
# Under the sanitizer everything runs ~10-100x slower: a few cases only, and no caching allocator, so that every
# tensor is an allocation of its own.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
step memcheck 75 compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" -m pytest -q -x -p no:cacheprovider \
  tests/test_box_pool.py tests/test_box_fill.py tests/test_normalized_mse.py \
  -k "(cuda-cuda or cuda-triton) and f32 and (forward_matches_oracle or backward_matches_oracle or test_matches_oracle) \
and (mixed or empty_image or levels)"
step racecheck 45 compute-sanitizer --tool racecheck --error-exitcode 1 "$PY" -m pytest -q -x -p no:cacheprovider \
  tests/test_normalized_mse.py -k "cuda-cuda and f32 and test_matches_oracle and (levels or big_plane)"
unset PYTORCH_NO_CUDA_MEMORY_CACHING
if [ "$has_lgd" -eq 1 ]; then
  step bench_train 120 "$PY" benchmarks/bench_train.py --device cuda --image 800 1216 --iters 5 --out "$WORK"
else
  say "skipped bench_train: lgd does not import here (no detectron2)"
fi

say "$failed step(s) failed"
for md in "$WORK"/*.md; do
  [ -e "$md" ] && { echo; cat "$md"; } >>"$WORK/summary.txt"
done
cp "$WORK/summary.txt" "$WORK"/*.csv "$OUT"/ 2>/dev/null
timeout -k 5 30 tar -czf "$OUT/results.tar.gz" -C "$WORK" . || echo "[gpu_check] packing the results failed"
echo "[gpu_check] results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$failed"
