#!/usr/bin/env bash
# One node, NeMo's trainer (MegatronStrategy). Default: DeepSeek-V2-Lite LoRA on 8 GPUs (EP=8).
#   BASE=/ckpt/deepseek_v2_lite recipes/torchrun_one_node.sh model=deepseek_v2_lite [overrides]
# Needs: CUDA GPUs, the pinned stack (make setup), a base NeMo checkpoint (e.g. from llm.import_ckpt of
# the HF model). Without Transformer Engine the local layer spec is used (README "The GPU path";
# bench/run_gpu.sh is the scripted GPU run).
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS=${GPUS:-8}
exec .venv/bin/torchrun --nproc_per_node="$GPUS" -m nemo_mla_lora.recipes.finetune \
  trainer=megatron trainer.devices="$GPUS" trainer.num_nodes=1 ${BASE:+model.checkpoint=$BASE} "$@"
