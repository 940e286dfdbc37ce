#!/usr/bin/env bash
# Builds lgd_ops._C, CPU and CUDA sources, against the GPU machine's stack before device time is spent on it:
# torch $TORCH_VERSION (default 2.11.0, the GPU machine's; its extension build compiles C++17, while this
# machine's newer torch compiles C++20), installed with --no-deps into a temporary venv that sees this
# machine's packages (sympy, the nvidia-* CUDA libraries) for the rest, CUDA sources for sm_90 only
# (TORCH_CUDA_ARCH_LIST, default 9.0) with the toolkit at $CUDA_HOME (default /usr/local/cuda). The build
# runs in a temporary copy of the working tree (tracked and untracked-not-ignored files), so the tree's own
# in-place build is left alone; the built module is then loaded under that torch and must register the CUDA
# kernels. Run it whenever csrc/ changes. Prints one summary line; exit code 0 when everything compiled. The
# build's log is kept in $PREFLIGHT_LOG (default /tmp/lgd-gpu-preflight.log).
#   scripts/gpu_preflight.sh                      # ~5 min on 2 cores, plus the first download (~530 MB)
#   TORCH_VERSION=2.12.0 scripts/gpu_preflight.sh
# The torch wheel is kept in $PREFLIGHT_CACHE (default ~/.cache/lgd-preflight) between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
TORCH_VERSION="${TORCH_VERSION:-2.11.0}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" FORCE_CUDA=1
export MAX_JOBS="${MAX_JOBS:-2}"
cache="${PREFLIGHT_CACHE:-$HOME/.cache/lgd-preflight}"
log="${PREFLIGHT_LOG:-/tmp/lgd-gpu-preflight.log}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
t0=$(date +%s)
say() { echo "[preflight] $*"; }

mkdir -p "$cache"
if ! ls "$cache"/torch-"$TORCH_VERSION"-*.whl >/dev/null 2>&1; then
  say "downloading torch==$TORCH_VERSION (no dependencies) into $cache"
  "$PY" -m pip download -q --no-deps "torch==$TORCH_VERSION" -d "$cache" \
    || { say "FAILED: torch==$TORCH_VERSION cannot be downloaded here"; exit 1; }
fi
"$PY" -m venv --system-site-packages "$work/venv"
VPY="$work/venv/bin/python"
say "installing torch==$TORCH_VERSION into a temporary venv"
"$VPY" -m pip install -q --no-deps --no-compile "$cache"/torch-"$TORCH_VERSION"-*.whl
site=$("$VPY" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
# setup.py looks for the CUDA headers that ship in the nvidia wheels (cusparse.h) next to torch.
nvidia=$("$PY" -c "import nvidia; print(list(nvidia.__path__)[0])" 2>/dev/null || true)
[ -n "$nvidia" ] && [ ! -e "$site/nvidia" ] && ln -s "$nvidia" "$site/nvidia"
torch_seen=$("$VPY" -c "import torch; print(torch.__version__)")
[ "${torch_seen%%+*}" = "$TORCH_VERSION" ] || { say "FAILED: the venv imports torch $torch_seen"; exit 1; }

mkdir "$work/tree"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$work/tree" 2>/dev/null || true
cd "$work/tree"
say "building against torch $torch_seen, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, CUDA_HOME=$CUDA_HOME"
if ! "$VPY" setup.py build_ext --inplace >"$log" 2>&1; then
  grep -E "error" "$log" | head -n 40
  say "FAILED: the build against torch $torch_seen (errors above; the whole log: $log)"
  exit 1
fi
stds=$(grep -oE -- "-std=c\+\+[0-9a-z]+" "$log" | sort -u | paste -sd ' ' -)
compiled=$(grep -cE "^\[[0-9]+/[0-9]+\] .*(c\+\+|nvcc).* -c " "$log" || true)
cuda_units=$(grep -oE "csrc/[a-z_/]+\.cu\b" "$log" | sort -u | paste -sd ' ' -)
warnings=$(grep -c "warning" "$log" || true)
# The module must load under that torch and register the CUDA kernels (no GPU needed for either).
"$VPY" - <<'EOF' || { say "FAILED: the built module does not load under torch $torch_seen"; exit 1; }
import glob
import torch
torch.ops.load_library(glob.glob("lgd_ops/_C*.so")[0])
for op in ("box_pool", "box_fill", "normalized_mse"):
    table = torch._C._dispatch_dump(f"lgd_ops::{op}")
    assert "CUDA:" in table and "CPU:" in table, f"lgd_ops::{op} lacks a CPU or CUDA kernel:\n{table}"
EOF
say "ok: $(date -u '+%Y-%m-%d %H:%M UTC'), torch $torch_seen, ${stds}, $compiled translation units compiled" \
    "(CUDA: $cuda_units for sm_${TORCH_CUDA_ARCH_LIST//./}), $warnings lines with 'warning' in $log," \
    "CPU and CUDA kernels registered, $(($(date +%s) - t0)) s"
