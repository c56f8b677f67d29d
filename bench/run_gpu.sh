#!/usr/bin/env bash
# Issue 6 on the lent GPU machine (one H100/H200; Python 3.12, torch CUDA, no NeMo, no Transformer Engine).
#   bash bench/run_gpu.sh finetune   # NeMo llm.finetune (base stage, then MLALoRA), export callback, verify
#   bash bench/run_gpu.sh overhead   # bench/lora_overhead.py: one V3-shaped layer, bf16, seq 4096
# Installs .gpu_wheels/ (bench/prepare_gpu.sh) into a scratch site; results go under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
SITE=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu_wheels/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH="$SITE" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd /tmp  # import the installed package, not the source tree
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
REPO=$OLDPWD

finetune() {
  local run=/tmp/run_finetune
  rm -rf "$run"
  python3 -m nemo_mla_lora.recipes.finetune model=deepseek_v3_small trainer=megatron data=cpu \
    data.tokenizer=byte data.seq_length=64 data.base_pretrain_steps=300 data.base_pretrain_lr=5e-4 \
    trainer.max_steps=80 trainer.global_batch_size=32 trainer.micro_batch_size=8 trainer.val_check_interval=20 \
    trainer.limit_val_batches=4 trainer.log_every_n_steps=5 trainer.checkpoint_every_n_steps=300 \
    optim.lr=1e-3 optim.warmup_steps=10 "output_dir=$run" 2>&1 | tee "$OUT/finetune.log"
  local rc=${PIPESTATUS[0]}
  for f in summary.json base_metrics.jsonl lora_metrics.jsonl export/manifest.json; do
    [ -f "$run/$f" ] && cp "$run/$f" "$OUT/finetune_$(basename "$f")"
  done
  du -sh "$run"/* 2>/dev/null | tee -a "$OUT/finetune.log"
  return "$rc"
}

overhead() {
  python3 "$REPO/bench/lora_overhead.py" --iters 20 --out "$OUT/lora_overhead.json" \
    --profile linear_kv_up_proj:16 all_linear:64 2>&1 | tee "$OUT/overhead.log"
  return "${PIPESTATUS[0]}"
}

"$@"
