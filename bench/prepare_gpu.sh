#!/usr/bin/env bash
# Here (no GPU): fetch the wheels the GPU machine lacks into .gpu_wheels/ (git-ignored) and add a fresh
# wheel of this package, so that `bench/run_gpu.sh` installs exactly this working tree there.
# Then call the device tool with carry [".gpu_wheels"] and command "bash bench/run_gpu.sh STEP".
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .gpu_wheels/nemo_toolkit-2.7.3-py3-none-any.whl ] || bash scripts/gpu/fetch_gpu_wheels.sh .gpu_wheels
# FlashMLA's wheel (added to gpu_wheels.txt later than the rest): fetched alone into an existing folder
ls .gpu_wheels/sgl_flash_mla-1.0.0-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d .gpu_wheels sgl-flash-mla==1.0.0
rm -f .gpu_wheels/nemo_mla_lora-*.whl
rm -rf build
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .gpu_wheels .
rm -rf build
ls .gpu_wheels | wc -l
du -sh .gpu_wheels
