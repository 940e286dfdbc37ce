#!/usr/bin/env bash
# The test command: sets everything up (scripts/install.sh), builds the C++ kernels with CMake and
# runs ctest, then runs the Python test suite. Extra arguments go to pytest (e.g. -k box_pool).
# Triton kernels run under TRITON_INTERPRET=1 on machines without a GPU. Exits with pytest's code.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"

bash scripts/install.sh
echo "[test] CMake build + ctest (shared kernel math, kernel library)"
cmake -S . -B cmake-build -DPython3_EXECUTABLE="$(command -v "$PY")" >/dev/null
cmake --build cmake-build -j"$(nproc)" >/dev/null
ctest --test-dir cmake-build --output-on-failure
echo "[test] pytest"
exec "$PY" -m pytest -q tests "$@"
