#!/usr/bin/env bash
# The GPU check (README, "GPU"): every stage's CUDA path on one machine with one GPU, in under
# 10 minutes on an H100. Writes benchmarks/results/gpu.json (benchmarks/gpu_check.py says what
# each section measures).
#
#   bash benchmarks/gpu_check.sh                            # pip-installs the gpu extra first
#   LEAF_RAY_WHEELS=.gpu-kit bash benchmarks/gpu_check.sh   # no package index: the folder
#                                                           # benchmarks/gpu_offline_kit.sh gathered
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ -n "${LEAF_RAY_WHEELS:-}" ]; then
  site=$(mktemp -d)
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$LEAF_RAY_WHEELS"/*.whl
  tar -xJf "$LEAF_RAY_WHEELS/ray.tar.xz" -C "$site"
  export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
else
  "$python" -m pip install -q -e ".[gpu]"
fi
export PYTHONUNBUFFERED=1
"$python" benchmarks/gpu_check.py "$@"
