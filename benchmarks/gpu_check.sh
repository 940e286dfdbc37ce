#!/usr/bin/env bash
# One-shot GPU check for the GPU machine (python3 with torch, triton and nvcc preinstalled; no network; maybe no
# detectron2 or pycocotools: the tests needing them skip themselves, and the training benchmark is skipped):
#   device       nvidia-smi, nvcc and the versions of torch and triton
#   build        lgd_ops._C in place for sm_90 (setup.py build_ext --inplace: no pip, no network)
#   backends     lgd_ops must offer the cuda backend
#   tests        the tests of the CUDA and Triton parametrizations (-k "cuda or triton"; CI runs the rest on CPU),
#                with pytest-xdist when available
#   bench_ops_*  the op benchmarks at the RetinaNet and Faster R-CNN shapes, fp32 NCHW then bf16 channels_last
#   memcheck     compute-sanitizer memcheck on a few CUDA and Triton forward/backward tests
#   racecheck    compute-sanitizer racecheck on the normalized_mse CUDA tests (its kernel uses shared memory)
#   bench_train  the training-step benchmark, only where lgd (so detectron2) imports
# The steps run in that order, the numbers the issue needs (tests, benchmarks) before the sanitizers.
# Schedule: each step has a budget (BUDGETS) and starts only while its whole budget is left before the deadline
# (GPU_CHECK_SECONDS, default 510, counted from the start, less RESERVE for packing the results); a step that
# does not fit is reported "skipped: no time", not failed. Its command runs under `timeout` with the budget less
# GRACE (the kill delay of `timeout -k`), so a step never outlasts its budget. The budgets add up to the default
# deadline less the probes', the packing's and 10 s of slack, so every step gets its chance even when each one
# before it runs out its budget, and the script ends within 510 s of the device tool's 600 s per command.
# GPU_CHECK_DRY_RUN=1: a rehearsal of the schedule on any machine. Every command (probes included) is replaced by
# `sleep` for GPU_CHECK_DRY_FILL percent (default 50) of its limit, the steps named in GPU_CHECK_DRY_OVERRUN sleep past
# it, all times run GPU_CHECK_DRY_SCALE (default 50) times faster, and the probes' outcomes are taken as
# success (pytest-xdist and lgd present: every step scheduled); the summary is the real one.
# Results: $OUT if set (the device tool's output folder, which returns at most 8 files), else
# benchmarks/results/gpu-<name>: summary.txt (steps, benchmark tables), the benchmark CSVs (bench_ops appends
# each case as it finishes, so a step stopped by its timeout keeps the cases done) and results.tar.gz (every log
# and output). Exit code: the number of failed steps (skipped steps are not failures).
set -uo pipefail
cd "$(dirname "$0")/.."
declare -A BUDGETS=([device]=10 [build]=130 [backends]=10 [tests]=80 [bench_ops_float32]=60
                    [bench_ops_bfloat16]=60 [memcheck]=40 [racecheck]=20 [bench_train]=40)
PROBE_SECONDS=10  # each of the three probes (GPU name, pytest-xdist, lgd)
RESERVE=20        # packing the results
GRACE=5           # timeout -k: the kill after SIGTERM, for a command that ignores it; part of each budget
DRY="${GPU_CHECK_DRY_RUN:-0}"
SCALE=1
[ "$DRY" = 1 ] && SCALE="${GPU_CHECK_DRY_SCALE:-50}"
# Times in milliseconds of this run, kept in variables rather than printed by functions: no subshell per reading
# (a dry run's stand-ins take milliseconds, and forks would blur its schedule).
ms() { R=$(($1 * 1000 / SCALE)); }  # R = seconds of the schedule in milliseconds of this run
secs() { printf -v R '%d.%03d' $(($1 / 1000)) $(($1 % 1000)); }  # R = milliseconds as seconds
now() {  # R = the clock (bash 5's EPOCHREALTIME, whatever its locale's decimal mark; else date)
  if [ -n "${EPOCHREALTIME:-}" ]; then R=$((${EPOCHREALTIME//[!0-9]/} / 1000)); else R=$(date +%s%3N); fi
}
now; start=$R
ms "${GPU_CHECK_SECONDS:-510}"; deadline=$((start + R))
ms $RESERVE; deadline=$((deadline - R))
ms $GRACE; GRACE_MS=$R
PY="${PYTHON:-python3}"
export PATH="$(dirname "$(command -v "$PY")"):$PATH"  # ninja from the same environment
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"    # the in-place build, for tests and benchmarks
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" FORCE_CUDA=1 PYTHONUNBUFFERED=1
WORK=$(mktemp -d)  # logs and raw outputs, packed into $OUT/results.tar.gz at the end
trap 'rm -rf "$WORK"' EXIT
failed=0

say() { echo "[gpu_check] $*" | tee -a "$WORK/summary.txt"; }
limited() {  # limited LIMIT_MS COMMAND...: the command under timeout, killed GRACE after its limit at the latest
  local grace limit
  secs $GRACE_MS; grace=$R
  secs "$1"; limit=$R
  shift
  timeout -k "$grace" "$limit" "$@"
}
nap() {  # nap LIMIT_MS NAME: R = seconds a dry-run stand-in sleeps (three times its limit when NAME overruns)
  local fill="${GPU_CHECK_DRY_FILL:-50}"  # percent
  [[ " ${GPU_CHECK_DRY_OVERRUN:-} " == *" $2 "* ]] && fill=300
  secs $(($1 * fill / 100))
}
probe() {  # probe COMMAND...: a short check under timeout (in a dry run: a stand-in, its outcome assumed below)
  local limit
  ms $PROBE_SECONDS; limit=$((R - GRACE_MS))
  if [ "$DRY" = 1 ]; then
    nap "$limit" probe
    set -- sleep "$R"
  fi
  limited "$limit" "$@"
}
step() {  # step NAME COMMAND...: starts only with its whole budget left; logs to $WORK/NAME.log; reports
  local title=$1 budget_ms limit t0 left took rc=0
  shift
  ms "${BUDGETS[$title]}"; budget_ms=$R
  now; left=$((deadline - R))
  if [ "$left" -lt "$budget_ms" ]; then
    [ "$left" -lt 0 ] && left=0
    secs $((left * SCALE))
    say "skipped $title: no time (budget ${BUDGETS[$title]} s, $R s left)"
    return
  fi
  limit=$((budget_ms - GRACE_MS))
  if [ "$DRY" = 1 ]; then
    echo "dry run: $*" >"$WORK/$title.log"
    nap "$limit" "$title"
    set -- sleep "$R"
  fi
  echo "[gpu_check] $title: limit $((limit * SCALE / 1000)) s"
  now; t0=$R
  limited "$limit" "$@" >>"$WORK/$title.log" 2>&1 || rc=$?
  now; secs $(((R - t0) * SCALE)); took="$R s"
  if [ "$rc" -eq 0 ]; then
    say "ok      $title ($took)"
  elif grep -q "Device not supported" "$WORK/$title.log"; then
    say "skipped $title: compute-sanitizer does not support this device"
  else
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && rc="timed out after $((limit * SCALE / 1000)) s" || rc="exit $rc"
    say "FAILED  $title ($rc, $took): tail of $title.log"
    tail -n 25 "$WORK/$title.log" | tee -a "$WORK/summary.txt"
    failed=$((failed + 1))
  fi
}

[ "$DRY" = 1 ] && say "dry run: every command is a stand-in, times ${SCALE}x faster"
name=$(probe nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 | tr ' ' '_')
[ "$DRY" = 1 ] && name=dry-run
OUT="${OUT:-benchmarks/results/gpu-${name:-unknown}}"
mkdir -p "$OUT"
xdist=()
probe "$PY" -c "import xdist" 2>/dev/null || [ "$DRY" = 1 ] && xdist=(-n 8)
has_lgd=0
probe "$PY" -c "import lgd" 2>/dev/null || [ "$DRY" = 1 ] && has_lgd=1
versions="import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name())"
step device bash -c 'nvidia-smi; nvcc --version; "$0" -c "$1"' "$PY" "$versions"
tail -n 1 "$WORK/device.log" 2>/dev/null | tee -a "$WORK/summary.txt"
step build "$PY" setup.py build_ext --inplace
step backends "$PY" -c "import lgd_ops; b = lgd_ops.available_backends(); print(b); assert 'cuda' in b"
step tests "$PY" -m pytest -q -p no:cacheprovider "${xdist[@]}" -k "cuda or triton" tests
# fp32 NCHW (the default path) and bf16 channels_last (the fast training path's maps). The module itself, not
# `python -m lgd.tools.bench ops`, which would import lgd, hence detectron2, which the GPU machine lacks.
for case in "float32 contiguous" "bfloat16 channels_last"; do
  set -- $case
  step "bench_ops_$1" "$PY" -m lgd_ops.bench_ops --device cuda --shape retinanet faster_rcnn \
    --dtype "$1" --layout "$2" --objects 7 100 --out "$WORK"
done
# Under the sanitizer everything runs ~10-100x slower: a few cases only, and no caching allocator, so that every
# tensor is an allocation of its own.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" -m pytest -q -x -p no:cacheprovider \
  tests/test_box_pool.py tests/test_box_fill.py tests/test_normalized_mse.py \
  -k "(cuda-cuda or cuda-triton) and f32 and (forward_matches_oracle or backward_matches_oracle or test_matches_oracle) \
and (mixed or empty_image or levels)"
step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 "$PY" -m pytest -q -x -p no:cacheprovider \
  tests/test_normalized_mse.py -k "cuda-cuda and f32 and test_matches_oracle and (levels or big_plane)"
unset PYTORCH_NO_CUDA_MEMORY_CACHING
if [ "$has_lgd" -eq 1 ]; then
  step bench_train "$PY" -m lgd.benchmarks.train --device cuda --image 800 1216 --iters 5 --out "$WORK"
else
  say "skipped bench_train: lgd does not import here (no detectron2)"
fi

now; secs $(((R - start) * SCALE))
say "$failed step(s) failed, $R s"
for md in "$WORK"/*.md; do
  [ -e "$md" ] && { echo; cat "$md"; } >>"$WORK/summary.txt"
done
cp "$WORK/summary.txt" "$WORK"/*.csv "$OUT"/ 2>/dev/null
timeout -k 5 15 tar -czf "$OUT/results.tar.gz" -C "$WORK" . || echo "[gpu_check] packing the results failed"
echo "[gpu_check] results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$failed"
