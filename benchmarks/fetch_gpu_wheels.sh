#!/usr/bin/env bash
# Download, on a machine with network, the wheels benchmarks/gpu_check.sh installs on a GPU machine
# without one: torchao 0.18.0 (built against torch 2.11: the device image's torch; cp310-abi3, so
# any CPython >= 3.10), for the torchao FP8 rows. Into .whl/ (git-ignored); pass it with the run.
# --no-deps: torchao needs nothing beyond torch at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  -d .whl "torchao==${TORCHAO_VERSION:-0.18.0}"
ls -la .whl
