#!/usr/bin/env bash
# The main job: sets everything up (scripts/install.sh), then runs what lgd can do today.
# Today that is the op report: every lgd_ops backend against the reference at the COCO RetinaNet
# shape, written to benchmarks/results/. LGD training and evaluation on the bundled demo data join
# this script when the method (lgd/) and the demo data land.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"

bash scripts/install.sh
echo "[main] op report: lgd_ops backends vs reference (benchmarks/bench_ops.py)"
"$PY" benchmarks/bench_ops.py --shape retinanet "$@"
