#!/usr/bin/env bash
# Sets up lgd on a fresh machine, into ${PYTHON:-python}'s environment:
#   1. the pinned stack (requirements.txt),
#   2. detectron2 (scripts/install_detectron2.sh: the PyPI route, or an existing install is kept),
#   3. lgd itself, editable, compiling lgd_ops._C: the C++ CPU kernels always, the CUDA kernels
#      when a CUDA toolkit is found (LGD_OPS_NO_CUDA=1 skips them; see setup.py),
#   4. the demo assets (scripts/fetch_demo_assets.sh: pinned wheels' data into ${LGD_CACHE:-~/.cache/lgd}).
# Safe to rerun: installed pins are kept; step 3 is skipped when lgd is installed editable from this tree and
# nothing the kernels are built from changed (a stamp next to lgd_ops/_C*.so), and otherwise ninja recompiles
# only what changed (objects persist under build/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
log() { echo "[install] $*"; }

log "pinned stack (requirements.txt)"
"$PY" -m pip install -q --disable-pip-version-check -r requirements.txt
bash scripts/install_detectron2.sh

# What the kernels are built from: sources, build files, Python, torch, CUDA settings.
build_key() {
  {
    find csrc -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    sha256sum setup.py pyproject.toml
    "$PY" -c "import sys, importlib.metadata as m; print(sys.version, m.version('torch'))"
    env | grep -E '^(LGD_OPS_NO_CUDA|FORCE_CUDA|CUDA_HOME|CUDA_PATH|TORCH_CUDA_ARCH_LIST)=' | sort || true
    command -v nvcc || true
  } | sha256sum | cut -d' ' -f1
}
# lgd is installed editable from this tree (not from another clone) and lgd_ops resolves here.
installed_from_here() {
  local tree=$PWD
  (cd / && "$PY" - "$tree" <<'PYEOF'
import importlib.metadata, importlib.util, json, os, sys
tree = os.path.realpath(sys.argv[1])
try:
    url = json.loads(importlib.metadata.distribution("lgd").read_text("direct_url.json") or "{}").get("url", "")
except importlib.metadata.PackageNotFoundError:
    url = ""
spec = importlib.util.find_spec("lgd_ops")
found = spec and os.path.realpath(spec.submodule_search_locations[0]) == os.path.join(tree, "lgd_ops")
sys.exit(0 if found and url.startswith("file://") and os.path.realpath(url[7:]) == tree else 1)
PYEOF
  )
}
stamp=lgd_ops/_C.build-key  # next to the built lgd_ops/_C*.so
key=$(build_key)
if compgen -G "lgd_ops/_C*.so" >/dev/null && [ "$(cat "$stamp" 2>/dev/null)" = "$key" ] && installed_from_here; then
  log "lgd is installed from this tree and no kernel source changed: build skipped"
else
  log "building lgd (pip install --no-build-isolation -e .; the first extension build takes minutes)"
  rm -f "$stamp"
  build_log=$(mktemp)
  trap 'rm -f "$build_log"' EXIT
  if ! "$PY" -m pip install -v --disable-pip-version-check --no-build-isolation --no-deps -e . >"$build_log" 2>&1; then
    tail -n 60 "$build_log"
    log "build FAILED (full log above)"
    exit 1
  fi
  grep -o "lgd_ops: building .*" "$build_log" | sort -u | sed 's/^/[install] /' || true
  echo "$key" >"$stamp"
fi
bash scripts/fetch_demo_assets.sh || log "WARNING: demo assets not fetched; rerun scripts/fetch_demo_assets.sh"
cd /  # import the installed package, not the source tree
"$PY" -c "import lgd_ops; print('[install] lgd_ops backends:', lgd_ops.available_backends())"
