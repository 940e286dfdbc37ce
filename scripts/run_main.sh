#!/usr/bin/env bash
# The main job: sets everything up (scripts/install.sh: pinned stack, detectron2, the lgd build, the demo assets),
# then
#   1. the demo (lgd-demo): LGD on real aerial tree images (deepforest tiles) with a small RetinaNet
#      (ImageNet MobileNetV2), fused lgd_ops, ~10 minutes on 2 CPU cores; COCO AP/AP50 of the student, the
#      LGD op report on the run's shapes, loss/AP plots and summary.json in ${LGD_DEMO_OUT:-output/demo};
#   2. the op report at the COCO RetinaNet shape: every lgd_ops backend against the reference
#      (lgd-bench ops, lgd_ops/bench_ops.py), written next to the demo's output (op_report/).
# Arguments go to the demo, e.g.  scripts/run_main.sh --compare --seeds 0 1 2   or   scripts/run_main.sh --overwrite
# A rerun continues (or reuses) the runs already in the output folder (--resume is implied), unless --overwrite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"

bash scripts/install.sh
echo "[main] demo: LGD on the deepforest tree tiles (lgd-demo $*)"
OUT="${LGD_DEMO_OUT:-output/demo}"
resume=(--resume)
for arg in "$@"; do
  if [ "$arg" = "--overwrite" ] || [ "$arg" = "--resume" ]; then resume=(); fi
done
"$PY" -m lgd.tools.demo --output-dir "$OUT" "${resume[@]}" "$@"
echo "[main] op report: lgd_ops backends vs reference at the COCO RetinaNet shape (lgd-bench ops)"
"$PY" -m lgd.tools.bench ops --shape retinanet --out "$OUT/op_report"
