#!/usr/bin/env bash
# For a GPU machine that cannot reach a package index: gathers here, into .gpu-kit/ (ignored by
# git), what benchmarks/gpu_check.sh needs beyond a CUDA PyTorch image (torch, transformers,
# pandas, pyarrow ...): Ray and the pure-Python packages it and leaf-ray import. Copy the folder
# there and run `LEAF_RAY_WHEELS=.gpu-kit bash benchmarks/gpu_check.sh`.
#
# Ray is unpacked without its Java jar, its dashboard UI and RLlib, none of which the check
# imports, to keep the kit near 35 MB. vLLM's CUDA wheel (hundreds of MB) is not in it: without
# vLLM the check's serve section reports itself skipped.
#
#   bash benchmarks/gpu_offline_kit.sh [python version of the GPU machine, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
kit=.gpu-kit
rm -rf "$kit" && mkdir -p "$kit"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d "$kit" \
  ray==2.60.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
  rpds-py==2026.9.1 tensorboardX==2.6.5
unpacked=$(mktemp -d)
python3 -m zipfile -e "$kit"/ray-*.whl "$unpacked"
chmod +x "$unpacked"/ray/core/src/ray/gcs/gcs_server "$unpacked"/ray/core/src/ray/raylet/raylet
rm -rf "$unpacked"/ray/jars "$unpacked"/ray/dashboard/client "$unpacked"/ray/rllib
tar -C "$unpacked" -cf - . | xz -T0 -6 > "$kit/ray.tar.xz"
rm -rf "$unpacked" "$kit"/ray-*.whl
du -sh "$kit"
