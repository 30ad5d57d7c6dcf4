#!/usr/bin/env bash
# The GPU check on any CUDA host with PyTorch, numpy and pyyaml (no Ray, MLflow, pytest or install):
# tests/test_gpu.py with a GPU required, then the GPU benchmark table. `make gpu-check` runs this.
#
#   benchmarks/gpu_check.sh [--data-dir DIR]      # MNIST: DIR, else $DISTNET_DATA, ../shared/data/mnist, ~/.cache
# PYTHON picks the interpreter (default: .venv/bin/python if there, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --data-dir ]; then export DISTNET_DATA=$(realpath "$2"); fi
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export DISTNET_REQUIRE_GPU=1
status=0
"$py" tests/test_gpu.py || status=$?
"$py" benchmarks/gpu_bench.py || status=$?
exit $status
