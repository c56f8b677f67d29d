#!/usr/bin/env bash
# Here (no GPU), after `make run`: the inputs of `bash bench/run_gpu.sh mcore019` (device tool carry:
# [".gpu_wheels019", "runs/gpu_proof"]): the megatron-core 0.19.2 wheel (2.4 MB, needs only torch/numpy/packaging,
# all on the GPU image), the default run's mcore export, and what 0.19 must reproduce (bench/mcore019_expected.py).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu_wheels019 runs/gpu_proof
ls .gpu_wheels019/megatron_core-0.19.2-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 -d .gpu_wheels019 megatron-core==0.19.2
rm -rf runs/gpu_proof/export  # TE-free names: 0.19.2 runs there without Transformer Engine
.venv/bin/python -m nemo_mla_lora.recipes.export base=runs/finetune/base adapter=runs/finetune/adapter \
  output=runs/gpu_proof/export format=mcore names=local
.venv/bin/python bench/mcore019_expected.py runs/finetune runs/gpu_proof/expected.pt
du -sh .gpu_wheels019 runs/gpu_proof
