#!/usr/bin/env bash
# One node, NeMo's trainer (MegatronStrategy). Default: DeepSeek-V2-Lite LoRA on 8 GPUs (EP=8).
#   BASE=/ckpt/deepseek_v2_lite recipes/torchrun_one_node.sh model=deepseek_v2_lite [overrides]
# Needs: CUDA GPUs, the pinned stack (make setup), a base checkpoint (Megatron dist-ckpt + mla_spec.json,
# or an HF directory). Without Transformer Engine the local layer spec is used (no sequence-parallel
# fused norms needed: see README "GPU path").
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS=${GPUS:-8}
exec .venv/bin/torchrun --nproc_per_node="$GPUS" -m nemo_mla_lora.recipes.finetune \
  trainer=megatron trainer.devices="$GPUS" trainer.num_nodes=1 ${BASE:+model.checkpoint=$BASE} "$@"
