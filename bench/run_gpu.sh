#!/usr/bin/env bash
# The GPU steps, by name, on the lent GPU machine (Python 3.12, torch CUDA; no NeMo, Megatron or Transformer Engine
# until carried). bench/README.md ("How to run") says which prepare script makes each step's carry folders.
# Training through NeMo's llm.finetune:
#   finetune | finetune_grouped           1 GPU, TE-free spec: base stage then MLALoRA (all_linear: grouped experts)
#   finetune_tp2 | finetune_ep2           2 GPUs, TE-free spec: TP=2 + SP / EP=2, callback export vs one-process export
#   te_finetune | te_tests                1 GPU, Transformer Engine spec (bring-up call first); tests/peft/test_te_gpu.py
#   peft_gpu_tests                        the adapter tests that need no TE (lora_around, grouped LoRA), on CUDA
#   te_finetune_tp2 | te_finetune_ep2     2 GPUs, TE spec (bring-up call first)
# Training cost:
#   overhead                              grouped LoRA GPU tests; bench/lora_overhead.py (V3 layer, bf16, seq 4096)
#   te_overhead | te_profile              the same table on the TE spec beside the TE-free one; torch profiles
#   v3_layers                             DeepSeek-V3 layers at real width (bench/v3_layers.py), paper projection
#   te_fp8                                TE spec, bf16 and FP8 frozen base in one process: summary.json (FP8
#                                         blockwise), summary_tensorwise.json (TE bring-up first)
# Real size (DeepSeek-V2-Lite from an HF directory, bench/prepare_real_size.sh):
#   real_size_table                       the step table: frozen, MLALoRA nemo_official / all_linear r64, NeMo's LoRA
#   real_size_finetune                    recipes.finetune trainer=megatron from the HF directory, mcore export callback
#   real_size_check | real_size_export | real_size_engine   Megatron 0.15.3/0.19.2 loads; export vs cp; engine decode
#   real_size_io                          no training, no TE: the base + a LoRA on every linear, then real_size_export
#   real_size_floor                       the load check on the base alone (run before real_size_check: its bound)
# Export and its consumers:
#   export_cores                          bench/export_scale.py (V2-Lite shape, 6 layers) on 16 and 2 cores
#   mcore019 | megatron_release           Megatron-Core 0.19.2 alone loads the mcore export (+ the q-side fix)
#   nemo_engines                          NeMo llm.generate + Megatron's TE-spec load (bench/prepare_nemo_proof.sh)
# Decode:
#   decode [--no-sweep] | decode_hopper [--quick] | decode_ncu "default 64 64 4096" | decode_adapters
#   gluon_decode | gluon_time             the warp-specialised Gluon kernel's GPU tests and timing | timing alone
#   gluon_tests | backend_tests           the Gluon kernel's and the engine backends' GPU tests | the latter alone
#   decode_sweep [--quick]                the roofline sweep alone, its goals (decode_goals.py), ncu of the Gluon kernel
#   decode_engine_4k                      the engine at context 4,096: ours, FlashMLA's and the Gluon kernel
#   moe_decode                            a V2-Lite MoE layer at decode batches: Megatron's layer vs GroupedMoE
# Placement study:
#   placement_study [overrides] | placement_continue [overrides]
# Several steps in one call: chain STEP [STEP ...]; two at once: beside STEP STEP
# Installs .gpu_wheels/ (made by bench/prepare_gpu.sh) into a scratch site; results go under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
for d in .gpu_wheels .gpu_wheels019 .real_size; do  # carry [".gpu_snap"] alone also serves steps run from the root
  [ -e "$d" ] || [ ! -d ".gpu_snap/$d" ] || ln -s ".gpu_snap/$d" "$d"
done
SITE=/tmp/site
case "${1:-}" in mcore019|megatron_release) ;; *)  # every other step runs NeMo 2.7.3 + megatron-core 0.15.3
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu_wheels/*.whl \
    || { echo "wheel install failed"; exit 1; } ;;
esac
export PYTHONPATH="$SITE" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
REPO=$PWD
cd /tmp  # import the installed package, not the source tree
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)" | tee -a "$OUT/gpu.txt"

GPU_PROOF=(model=deepseek_v3_small trainer=megatron data=cpu data.tokenizer=byte data.seq_length=64
  trainer.global_batch_size=32 trainer.micro_batch_size=8 trainer.val_check_interval=20 trainer.limit_val_batches=4
  trainer.log_every_n_steps=5 optim.lr=1e-3 optim.warmup_steps=10)

collect() {  # run dir, tag
  for f in summary.json base_metrics.jsonl lora_metrics.jsonl export/manifest.json; do
    [ -f "$1/$f" ] && cp "$1/$f" "$OUT/$2_$(basename "$f")"
  done
  du -sh "$1"/* 2>/dev/null | tee -a "$OUT/$2.log"
}

finetune() {
  local run=/tmp/run_finetune; rm -rf "$run"
  timeout 560 python3 -m nemo_mla_lora.recipes.finetune "${GPU_PROOF[@]}" data.base_pretrain_steps=300 \
    data.base_pretrain_lr=5e-4 trainer.max_steps=80 trainer.checkpoint_every_n_steps=300 "output_dir=$run" \
    2>&1 | tee "$OUT/finetune.log"
  local rc=${PIPESTATUS[0]}; collect "$run" finetune; return "$rc"
}

finetune_grouped() {  # all_linear (grouped expert adapters, torch._grouped_mm) through NeMo's llm.finetune
  local run=/tmp/run_grouped; rm -rf "$run"
  timeout 420 python3 -m nemo_mla_lora.recipes.finetune "${GPU_PROOF[@]}" peft=all_linear peft.dim=16 peft.alpha=16 \
    data.base_pretrain_steps=60 data.base_pretrain_lr=5e-4 trainer.max_steps=40 trainer.checkpoint_every_n_steps=60 \
    "output_dir=$run" 2>&1 | tee "$OUT/finetune_grouped.log" | grep -E "grouped|loss|verif|Error|error" | tail -20
  local rc=${PIPESTATUS[0]}; collect "$run" finetune_grouped; return "$rc"
}

two_gpus() {  # tag, parallel overrides: train on two GPUs (torchrun), then export the saved base + adapter
  # in one process and compare it with the callback's export, tensor by tensor
  local tag=$1; shift; local run=/tmp/run_$tag; rm -rf "$run"
  timeout 420 python3 -m torch.distributed.run --nproc-per-node 2 -m nemo_mla_lora.recipes.finetune "${GPU_PROOF[@]}" \
    trainer.devices=2 "$@" data.base_pretrain_steps=60 data.base_pretrain_lr=5e-4 trainer.max_steps=40 \
    trainer.checkpoint_every_n_steps=60 "output_dir=$run" 2>&1 | tee "$OUT/$tag.log"
  local rc=${PIPESTATUS[0]}; collect "$run" "$tag"; [ "$rc" = 0 ] || return "$rc"
  CUDA_VISIBLE_DEVICES="" timeout 150 python3 -m nemo_mla_lora.recipes.export "base=$run/base" \
    "adapter=$run/adapter" "output=/tmp/one_process_$tag" verify=false 2>&1 | tail -3 | tee -a "$OUT/$tag.log"
  python3 "$REPO/bench/compare_exports.py" "$run/export" "/tmp/one_process_$tag" \
    --out "$OUT/${tag}_vs_one_process.json" 2>&1 | tee -a "$OUT/$tag.log"
}

finetune_tp2() { two_gpus finetune_tp2 trainer.tensor_parallel=2 trainer.sequence_parallel=true; }
finetune_ep2() { two_gpus finetune_ep2 trainer.expert_parallel=2; }

export_cores() {  # the export at scale on this machine's 16 cores and on 2 of them (CPU only)
  local w=/tmp/xs; rm -rf "$w"; mkdir -p "$w"; unset OMP_NUM_THREADS
  export CUDA_VISIBLE_DEVICES=""
  nproc | tee "$OUT/cores.txt"; df -h /tmp | tail -1 | tee -a "$OUT/cores.txt"
  local t0=$SECONDS
  timeout 300 python3 "$REPO/bench/export_scale.py" make --shape v2-lite --layers "${LAYERS:-6}" --out "$w/base" \
    2>&1 | tail -2; echo "make: $((SECONDS - t0)) s"
  python3 "$REPO/bench/export_scale.py" disk --dir "$w" --gb 8 | tee -a "$OUT/cores.txt"
  for run in "hf all" "hf 0,1" "mcore all" "mcore 0,1"; do
    set -- $run; local cpus=(); [ "$2" = all ] || cpus=(--cpus "$2")
    timeout 150 python3 "$REPO/bench/export_scale.py" run --base "$w/base" --formats "$1" --disk "$w/disk.json" \
      --work "$w" --results "$OUT/${1}_${2//,/_}" "${cpus[@]}" 2>&1 | grep -E '^\{|Error|error' | cut -c1-600 | tail -4
  done
}

decode_hopper() {  # kernel tests, roofline sweep, decode_bench (tables, adapters, engine), ncu profiles
  python3 -m pytest -q -p no:cacheprovider "$REPO/tests/inference/test_triton_decode.py" \
    "$REPO/tests/inference/test_flashmla.py" "$REPO/tests/inference/test_moe_decode.py" -k "gpu or flashmla" -rs \
    > "$OUT/decode_tests.log" 2>&1
  tail -n 6 "$OUT/decode_tests.log"
  timeout 400 python3 "$REPO/bench/decode_roofline.py" --out "$OUT" "$@" 2>&1 | tee "$OUT/roofline.log" | tail -n 45
  local rc=${PIPESTATUS[0]}
  timeout 150 python3 "$REPO/bench/decode_bench.py" --no-sweep --out "$OUT/decode.json" \
    --sections attention attention_tp8 adapters > "$OUT/decode.log" 2>&1 || rc=1
  timeout 200 python3 "$REPO/bench/decode_bench.py" --out "$OUT/engine.json" --sections engine engine_flashmla \
    > "$OUT/engine.log" 2>&1 || rc=1
  python3 -c "import json; print(json.load(open('$OUT/decode.json'))['adapters']); print(json.load(open('$OUT/engine.json'))['engine'])"
  [ "${NCU:-1}" = 0 ] && return "$rc"
  decode_ncu "default 16 64 4096" "default 128 64 4096"
  return "$rc"
}

decode_sweep() {  # the roofline sweep alone (every kernel's graphed row, FlashMLA's and the Gluon schedules'
  # included, each seesaw one only if its smoke launch ran), then ncu of the Gluon kernels at 128 heads
  local s skip=() ran=(); for s in "${GLUON_SCHEDULES_ALL[@]:1}"; do
    if gluon_smoke "$s"; then ran+=("gluon_$s"); else skip+=("gluon_$s"); fi
  done
  timeout -k 5 540 python3 "$REPO/bench/decode_roofline.py" --out "$OUT" ${skip[@]:+--skip "${skip[@]}"} "$@" 2>&1 \
    | tee "$OUT/roofline.log" | tail -n 3
  local rc=${PIPESTATUS[0]}
  python3 "$REPO/bench/decode_goals.py" "$OUT/decode_roofline.json" --json "$OUT/goals.json" | tail -n 45
  [ "${NCU:-1}" = 0 ] && return "$rc"
  decode_ncu "gluon 128 64 4096" "gluon 128 32 32768"
  for s in "${ran[@]}"; do decode_ncu "$s 128 64 4096"; done
  return "$rc"
}

decode_engine_4k() {  # the engine at context 4,096 (prompt 4,032 + 64 decode steps), ours, FlashMLA's and the Gluon
  # kernel (every schedule whose smoke launch ran): where they differ most (did not finish in 240 s inside
  # decode_hopper: its own call)
  local s extra=(); for s in "${GLUON_SCHEDULES_ALL[@]:1}"; do gluon_smoke "$s" && extra+=("engine_gluon_$s"); done
  timeout -k 5 540 python3 "$REPO/bench/decode_bench.py" --out "$OUT/engine_4k.json" \
    --sections engine engine_flashmla engine_gluon "${extra[@]}" \
    --prompt 4032 --steps 64 > "$OUT/engine_4k.log" 2>&1; local rc=$?
  grep -vi warn "$OUT/engine_4k.log" | tail -n 5; return "$rc"
}

moe_decode() {  # one V2-Lite MoE layer, bf16, at decode batch sizes: Megatron's own layer against the engine's
  # GroupedMoE (bench/moe_decode.py), then the MoE graph test (tests/inference/test_moe_decode.py)
  timeout 200 python3 "$REPO/bench/moe_decode.py" --device cuda --dtype bfloat16 --batches 1 8 64 256 \
    --out "$OUT/moe_decode.json" 2>&1 | grep -E "batch|Error" ; local rc=${PIPESTATUS[0]}
  timeout 200 python3 -m pytest -q -p no:cacheprovider "$REPO/tests/inference/test_moe_decode.py" -k gpu -rs \
    > "$OUT/moe_tests.log" 2>&1 || rc=1
  tail -n 3 "$OUT/moe_tests.log"; return "$rc"
}

GLUON_SMOKE='import torch; from nemo_mla_lora.inference.kernels import gluon_launch as g
q = torch.randn(2, 64, 576, device="cuda", dtype=torch.bfloat16)  # [b, h, c + d]
buf = torch.randn(2, 128, 576, device="cuda", dtype=torch.bfloat16)  # [b, P, c + d]
n = torch.tensor([100, 128], device="cuda", dtype=torch.int32)
import sys; schedule = sys.argv[1]
o = g.latent_decode_attention_ws(q[..., :512], q[..., 512:], buf[..., :512], buf[..., 512:], n, 0.05, schedule=schedule)
torch.cuda.synchronize(); print(f"gluon smoke ({schedule}): ran, max |o|", o.float().abs().max().item())'

GLUON_SCHEDULES_ALL=(pingpong seesaw seesaw_t32)  # gluon_launch.KERNELS, the default first
SMOKED=$(mktemp -d)  # a mark per schedule whose smoke launch ran in this call (subshells too; not among $OUT's files)

gluon_smoke() {  # one small launch of the Gluon kernel per schedule named (default all), 60 s at most each (a
  # barrier bug would hang); a schedule that ran once in this call is not launched again
  local s schedules=("$@"); [ $# = 0 ] && schedules=("${GLUON_SCHEDULES_ALL[@]}")
  for s in "${schedules[@]}"; do
    [ -f "$SMOKED/$s" ] && continue
    timeout -k 5 60 python3 -c "$GLUON_SMOKE" "$s" 2>&1 | tee "$OUT/gluon_smoke_$s.log" | tail -n 3
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "gluon smoke ($s) failed or hung"; return 1; }
    touch "$SMOKED/$s"
  done
}

gluon_running() {  # the schedules whose smoke launch ran, space-separated (their output on stderr)
  local s ok=(); for s in "${GLUON_SCHEDULES_ALL[@]}"; do gluon_smoke "$s" >&2 && ok+=("$s"); done; echo "${ok[*]}"
}

gluon_timing() {  # bench/gluon_compile.py --time: beside the TMA kernel and FlashMLA's, same process
  timeout -k 5 200 python3 "$REPO/bench/gluon_compile.py" --time --json "$OUT/gluon_time.json" 2>&1 \
    | tee "$OUT/gluon_time.log" | tail -n 25
  return "${PIPESTATUS[0]}"
}

gluon_tests() {  # the warp-specialised Gluon kernels: the smoke launches, their GPU tests and the engine through them
  # and through FlashMLA's (timeouts: a barrier bug would hang; a schedule that fails its smoke launch is left out of
  # the tests, and the step fails)
  local ok; ok=$(gluon_running)
  [[ " $ok " == *" pingpong "* ]] || return 1
  GLUON_SCHEDULES="${ok// /,}" timeout -k 5 360 python3 -m pytest -q -x -p no:cacheprovider \
    "$REPO/tests/inference/test_gluon_decode_gpu.py" "$REPO/tests/inference/test_decode_backends.py" -rs \
    > "$OUT/gluon_tests.log" 2>&1; local rc=$?
  tail -n 15 "$OUT/gluon_tests.log"
  [ "$ok" = "${GLUON_SCHEDULES_ALL[*]}" ] || { echo "tested $ok only: the others' smoke launch failed"; return 1; }
  return "$rc"
}

gluon_decode() {  # gluon_tests, then the kernel's timing
  gluon_tests; local rc=$?
  gluon_timing; return $(( rc || $? ))
}

backend_tests() {  # the engine's logits through the gluon and flashmla backends against our Triton kernels'
  timeout -k 5 240 python3 -m pytest -q -p no:cacheprovider "$REPO/tests/inference/test_decode_backends.py" -rs \
    > "$OUT/backend_tests.log" 2>&1; local rc=$?
  grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/backend_tests.log" | tail -n 8; return "$rc"
}

gluon_time() {  # the smoke launches and the timing without the tests: the shortest first run of the kernels
  gluon_smoke && gluon_timing
}

decode_ncu() {  # ncu profiles of the Hopper decode kernel, one per "launch heads batch context" argument
  # (e.g. bash bench/run_gpu.sh decode_ncu "default 64 64 4096": the 64-head case)
  for one in "$@"; do
    local kernel=split  # the Gluon kernels' own names, not their merge pass
    case "${one%% *}" in gluon) kernel=ws_decode ;; gluon_seesaw*) kernel=seesaw_decode ;; esac
    timeout 60 ncu --clock-control none --kernel-name "regex:$kernel" --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
      --section LaunchStats python3 "$REPO/bench/decode_roofline.py" --out "$OUT" --one $one \
      > "$OUT/ncu_${one// /_}.txt" 2>&1
    grep -E "Memory Throughput|DRAM Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Shared Memory Config|Duration" \
      "$OUT/ncu_${one// /_}.txt" | head -8 | sed "s/^/[$one] /"
  done
}

overhead() {  # the grouped/fused LoRA GPU tests, then the table, the profiles, more tokens, 64 experts
  python3 -m pytest -q -p no:cacheprovider "$REPO/tests/peft/test_grouped_lora.py" -k gpu > "$OUT/grouped_tests.log" 2>&1
  tail -n 3 "$OUT/grouped_tests.log"
  python3 "$REPO/bench/lora_overhead.py" --iters 20 --out "$OUT/lora_overhead.json" \
    --profile base:0 base_grouped:0 nemo_official:64 all_linear:64 > "$OUT/overhead.log" 2>&1
  local rc=$?; grep -v "^\s*$" "$OUT/overhead.log" | grep -E "^\||^card|^profile" | head -60
  python3 "$REPO/bench/lora_overhead.py" --legacy --iters 20 --ranks 16 64 --variants nemo_official all_linear \
    --profile all_linear:64 --out "$OUT/lora_overhead_legacy.json" 2>&1 | grep -E "^\||^card|^profile" \
    | tee "$OUT/overhead_more.log"
  # Is the remaining overhead per-launch (CPU) cost? More tokens per step: GPU time grows, launches do not.
  for b in 2 4; do
    python3 "$REPO/bench/lora_overhead.py" --batch "$b" --iters 10 --ranks 64 --variants nemo_official all_linear \
      --out "$OUT/lora_overhead_batch$b.json" 2>&1 | grep -E "^\||^card" | tee -a "$OUT/overhead_more.log"
  done
  python3 "$REPO/bench/lora_overhead.py" --experts 64 --iters 10 --ranks 16 64 --variants nemo_official all_linear \
    --profile all_linear:64 --out "$OUT/lora_overhead_e64.json" 2>&1 | grep -E "^\||^card|^profile" \
    | tee -a "$OUT/overhead_more.log"
  return "$rc"
}

decode() {  # the kernel's GPU tests, then the benchmark
  python3 -m pytest -q -p no:cacheprovider "$REPO/tests/inference/test_triton_decode.py" -k gpu > "$OUT/decode_tests.log" 2>&1
  tail -n 3 "$OUT/decode_tests.log"
  python3 "$REPO/bench/decode_bench.py" --out "$OUT/decode.json" "$@" > "$OUT/decode.log" 2>&1
  local rc=$?; tail -n 40 "$OUT/decode.log"; return "$rc"
}

# the study is not in the wheel: studies/ comes from the source tree ($REPO)
PS_ARGS=(model=mla_study_gpu study=gpu study.base_dir=/tmp/ps_bases)

ps_bases() {  # the two bases pretrained side by side (GPUs 0 and 1; cached in /tmp/ps_bases)
  local n; n=$(nvidia-smi -L | wc -l)
  CUDA_VISIBLE_DEVICES=0 PYTHONPATH="$SITE:$REPO" python3 -m studies.placement "${PS_ARGS[@]}" "$@" \
    study.pretrain_only=mla output_dir=/tmp/ps_base_mla > "$OUT/placement_base_mla.log" 2>&1 &
  local base_mla=$!
  CUDA_VISIBLE_DEVICES=$((n > 1 ? 1 : 0)) PYTHONPATH="$SITE:$REPO" python3 -m studies.placement "${PS_ARGS[@]}" "$@" \
    study.pretrain_only=twin output_dir=/tmp/ps_base_twin > "$OUT/placement_base_twin.log" 2>&1 &
  wait "$base_mla" $!
  grep -h "base pretraining" "$OUT"/placement_base_*.log
}

ps_grid() {  # SHARDS grid shards spread over the GPUs in GPUS (default: all), each resuming /tmp/ps_<i>,
  # stopping new runs DEADLINE_S seconds into this script; a shard on GPU $DECODE_GPU waits for $DECODE_PID
  local gpus; read -ra gpus <<< "${GPUS:-$(seq -s ' ' 0 $(($(nvidia-smi -L | wc -l) - 1)))}"
  local shards=${SHARDS:-$((${#gpus[@]} * 3))} deadline=${DEADLINE_S:-560}
  local budget=$((deadline - SECONDS - 90))  # 90 s: imports + the last run
  echo "grid: $shards shards on GPUs ${gpus[*]}, time budget ${budget} s"
  for i in $(seq 0 $((shards - 1))); do
    local gpu=${gpus[$((i % ${#gpus[@]}))]}
    ( [ -n "${DECODE_PID:-}" ] && [ "$gpu" = "${DECODE_GPU:-}" ] && while kill -0 "$DECODE_PID" 2>/dev/null; do sleep 2; done
      CUDA_VISIBLE_DEVICES=$gpu PYTHONPATH="$SITE:$REPO" timeout $((deadline - SECONDS)) python3 -m studies.placement \
        "${PS_ARGS[@]}" "$@" "study.shard=$i/$shards" "study.time_budget_s=$budget" "output_dir=/tmp/ps_$i" \
        >> "$OUT/placement_shard$i.log" 2>&1 ) &
  done
  wait
  ps_merge
}

placement_study() {  # [overrides]: bases, then the grid (with DECODE_GPU=i, `decode` runs alone on GPU i
  # while the bases train, and GPU i's shards start when it is done)
  rm -rf /tmp/ps_*
  if [ -n "${DECODE_GPU:-}" ]; then (export CUDA_VISIBLE_DEVICES=$DECODE_GPU; decode) & DECODE_PID=$!; fi
  ps_bases "$@"
  ps_grid "$@"
}

placement_continue() {  # [overrides]: the same grid again on a warm machine (bases and finished runs kept);
  # with DECODE_GPU=i, `decode` runs alone on GPU i meanwhile (keep i out of GPUS)
  if [ -n "${DECODE_GPU:-}" ]; then (export CUDA_VISIBLE_DEVICES=$DECODE_GPU; decode) & fi
  ps_grid "$@"
  wait
}

ps_merge() {  # every shard's runs.jsonl -> $OUT/placement_runs.jsonl
  python3 - "$OUT/placement_runs.jsonl" /tmp/ps_*/runs.jsonl <<'PY'
import json, sys
seen = {}
for path in sys.argv[2:]:
    for line in open(path):
        r = json.loads(line)
        seen[(r["arch"], r["variant"], r["lr_scale"], r["seed"])] = line
open(sys.argv[1], "w").writelines(seen.values())
print(len(seen), "runs")
PY
  tail -qn 1 "$OUT"/placement_shard*.log
}

mcore019() {  # megatron-core 0.19.2 alone (its own site, no NeMo) takes the default export as it is.
  # Inputs made here by: make run; bash bench/prepare_mcore019.sh  (carry .gpu_wheels019 runs/gpu_proof)
  local site=/tmp/site019
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$REPO"/.gpu_wheels019/megatron_core-0.19.2-*.whl || { echo "megatron-core 0.19.2 install failed"; return 1; }
  PYTHONPATH="$site" timeout 300 python3 "$REPO/bench/mcore019_check.py" "$REPO/runs/gpu_proof/export" \
    "$REPO/runs/gpu_proof/expected.pt" "$OUT/mcore019.json" 2>&1 | tee "$OUT/mcore019.log"
  return "${PIPESTATUS[0]}"
}

decode_adapters() {  # lora_kernels' GPU test, then decode_bench's adapter and engine sections
  # (the multi-adapter corrections with the kernels and in torch ops, same run)
  # -k gpu: Triton 3.6's interpreter fails there with NumPy 2.5 (a loop bound is a 1-element array; measured
  # 2026-12-01); the interpreter tests run on the CPU machines (NumPy 1.26)
  timeout 120 python3 -m pytest -q -p no:cacheprovider "$REPO/tests/inference/test_lora_kernels.py" -k gpu \
    > "$OUT/lora_kernel_tests.log" 2>&1
  grep -E "^(FAILED|E )|passed|failed" "$OUT/lora_kernel_tests.log" | tail -n 12
  timeout 200 python3 "$REPO/bench/decode_bench.py" --no-sweep --out "$OUT/decode_adapters.json" \
    --sections adapters engine > "$OUT/decode_adapters.log" 2>&1; local rc=$?
  python3 -c "import json; d = json.load(open('$OUT/decode_adapters.json')); print(d.get('adapters')); print(d.get('engine'))"
  return "$rc"
}

te_env() {  # Transformer Engine from /tmp/te_site (the bring-up call just before, on this warm machine) beside NeMo
  [ -d /tmp/te_site/transformer_engine ] || { echo "no Transformer Engine in /tmp/te_site: run the bring-up call first"; return 1; }
  local sp; sp=$(python3 -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')
  export PYTHONPATH="$SITE:/tmp/te_site" NVTE_FRAMEWORK=pytorch CUDNN_HOME="$sp/nvidia/cudnn" \
    LD_LIBRARY_PATH="$sp/nvidia/cudnn/lib:$sp/nvidia/cu13/lib:$sp/nvidia/nccl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

te_tests() {  # tests/peft/test_te_gpu.py and test_te_fp8_gpu.py (Transformer Engine from the bring-up call)
  te_env || return 1
  NVIDIA_TF32_OVERRIDE=0 TE_GPU_RECORD="$OUT/te_gpu_tests.jsonl" timeout 400 python3 -m pytest -q -p no:cacheprovider \
    "$REPO/tests/peft/test_te_gpu.py" "$REPO/tests/peft/test_te_fp8_gpu.py" "$REPO/tests/peft/test_lora_around.py" \
    > "$OUT/te_tests.log" 2>&1
  local rc=$?
  grep -E "^(FAILED|ERROR)|Error|assert|passed|failed" "$OUT/te_tests.log" | tail -n 25
  return "$rc"
}

peft_gpu_tests() {  # the adapters' CUDA tests that need no Transformer Engine (the factor gradients into
  # Megatron's main_grad: bf16 into fp32 through addmm's out_dtype on CUDA; the grouped adds' Triton kernel)
  timeout 240 python3 -m pytest -q -p no:cacheprovider "$REPO/tests/peft/test_lora_around.py" \
    "$REPO/tests/peft/test_grouped_lora.py" "$REPO/tests/peft/test_grouped_add.py" -m gpu -rs \
    > "$OUT/peft_gpu_tests.log" 2>&1; local rc=$?
  grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/peft_gpu_tests.log" | tail -n 8; return "$rc"
}

te_finetune() {  # the TE GPU tests; NeMo's TE spec (grouped-GEMM experts) trains MLALoRA through
  # llm.finetune and exports; then bench/te_check.py (below). Two calls: the TE bring-up of bench/prepare_nemo_proof.sh's
  # header (carry .te_carry), then this one within 30 s (carry .gpu_wheels). The bring-up skips its 100 s build
  # when the torch extension's wheel it built once (returned under $OUT) is put in /tmp/te/dist first:
  #   mkdir -p /tmp/te/dist && cp .te_carry/ext/*.whl /tmp/te/dist/; TE=.te_carry bash .te_carry/bring_up_te.sh ...
  te_env || return 1
  te_tests; local rc_tests=$?
  local run=/tmp/run_te; rm -rf "$run"
  timeout 300 python3 -m nemo_mla_lora.recipes.finetune "${GPU_PROOF[@]}" peft=all_linear peft.dim=16 peft.alpha=16 \
    data.base_pretrain_steps=40 data.base_pretrain_lr=5e-4 trainer.max_steps=30 trainer.checkpoint_every_n_steps=40 \
    "output_dir=$run" 2>&1 | tee "$OUT/te_finetune.log" | grep -E "TE|Grouped|loss|verif|Error|error" | tail -20
  local rc=${PIPESTATUS[0]}; collect "$run" te_finetune; [ "$rc" = 0 ] || return "$rc"
  # the saved base + adapter in the TE and the local-spec model (logits), then the local-spec model saved and
  # exported vs the callback's export, tensor for tensor (measured 2026-12-01: tests 75 s, finetune 200 s, this 60 s;
  # a one-process CPU export + compare_exports after it ran past the call's 600 s, so it is left out)
  rm -rf /tmp/te_local  # this script's own scratch folder
  timeout 200 python3 "$REPO/bench/te_check.py" "$run" --out "$OUT/te_logits.json" --export-local /tmp/te_local \
    2>&1 | grep -E '^\{|Error' | cut -c1-600
  local rc_check=${PIPESTATUS[0]}
  [ "$rc_tests" = 0 ] && [ "$rc_check" = 0 ]
}

te_two_gpus() {  # tag, overrides: the TE spec trained on two GPUs (torchrun), then bench/te_check.py on the saved
  # files in one process: the TE and local-spec models' logits, and the callback's export (written from TP/EP
  # shards) vs the local-spec model's re-export, tensor for tensor. TE bring-up first, as for te_finetune.
  te_env || return 1
  local tag=$1; shift; local run=/tmp/run_$tag; rm -rf "$run"
  timeout 420 python3 -m torch.distributed.run --nproc-per-node 2 -m nemo_mla_lora.recipes.finetune "${GPU_PROOF[@]}" \
    trainer.devices=2 peft=all_linear peft.dim=16 peft.alpha=16 "$@" data.base_pretrain_steps=40 \
    data.base_pretrain_lr=5e-4 trainer.max_steps=30 trainer.checkpoint_every_n_steps=40 "output_dir=$run" 2>&1 \
    | tee "$OUT/$tag.log" | grep -E "loss|verif|Error|error" | tail -20
  local rc=${PIPESTATUS[0]}; collect "$run" "$tag"; [ "$rc" = 0 ] || return "$rc"
  rm -rf "/tmp/${tag}_local"  # this script's own scratch folder
  timeout 200 python3 "$REPO/bench/te_check.py" "$run" --out "$OUT/${tag}_logits.json" --export-local "/tmp/${tag}_local" \
    2>&1 | grep -E '^\{|Error' | cut -c1-600
  return "${PIPESTATUS[0]}"
}

te_finetune_tp2() { te_two_gpus te_finetune_tp2 trainer.tensor_parallel=2 trainer.sequence_parallel=true; }
te_finetune_ep2() { te_two_gpus te_finetune_ep2 trainer.expert_parallel=2; }

te_overhead() {  # the LoRA overhead table on the TE spec (grouped-GEMM experts) beside the TE-free one
  te_env || return 1
  for spec in te local; do
    timeout 280 python3 "$REPO/bench/lora_overhead.py" --spec "$spec" --iters "${ITERS:-20}" --ranks 16 64 ${DDP:+--ddp} \
      --variants nemo_official all_linear --out "$OUT/lora_overhead_$spec.json" 2>&1 | grep -E "^\||^card|Error"
  done
}

te_fp8() {  # the LoRA cost table on the TE spec with a bf16 and an FP8 frozen base (fp8_param), one process per
  # FP8 recipe (DDP=1: adapters under Megatron's DDP, as llm.finetune trains them): blockwise (DeepSeek-V3's;
  # $OUT/summary.json), then tensorwise ($OUT/summary_tensorwise.json). Each
  # summary is rewritten after every cell, so a timeout keeps what finished. TE bring-up call first.
  # RECIPES="blockwise" runs that process alone; TE_FP8_TIMEOUT (default 260 s) bounds each process.
  te_env || return 1
  local rc=0 recipe file
  for recipe in ${RECIPES:-blockwise tensorwise}; do
    file=summary; [ "$recipe" = blockwise ] || file=summary_$recipe
    timeout "${TE_FP8_TIMEOUT:-260}" python3 "$REPO/bench/lora_overhead.py" --spec te --fp8 "$recipe" --iters "${ITERS:-20}" ${DDP:+--ddp} \
      --rounds "${ROUNDS:-1}" \
      --summary "$OUT/$file.json" > "$OUT/te_fp8_$recipe.log" 2>&1 || rc=1
    grep -E "^\||^card|Error|error" "$OUT/te_fp8_$recipe.log" | tail -n 30
  done
  return "$rc"
}

read_alloc() {  # the export reader's allocation cost: fresh tensors against one reused buffer, from /dev/shm
  python3 "$REPO/bench/read_alloc.py" --gib 4 | tee "$OUT/read_alloc.txt"
}

grouped_add_ab() {  # the grouped experts' adapter sums, peft/grouped_add's one launch against torch._grouped_mm
  # and an add (variant@torchadd), in one process on the TE spec, ROUNDS (default 2) rounds in forward and reversed
  # order, with profiles (FP8=blockwise: FP8 base)
  te_env || return 1
  local fp8=(); [ -n "${FP8:-}" ] && fp8=(--fp8 "$FP8")
  timeout 280 python3 "$REPO/bench/lora_overhead.py" --spec te --iters "${ITERS:-20}" --ranks 16 64 ${DDP:+--ddp} \
    --rounds "${ROUNDS:-2}" \
    --variants ${VARIANTS:-all_linear all_linear@torchadd} --profile all_linear:16 all_linear@torchadd:16 --profile-top 30 \
    "${fp8[@]}" --out "$OUT/grouped_add_ab.json" > "$OUT/grouped_add_ab.log" 2>&1; local rc=$?
  grep -E "^\||^profile|Error" "$OUT/grouped_add_ab.log"; return "$rc"
}

te_profile() {  # where the adapters' time goes on the TE spec and on the TE-free one (torch profiler);
  # SPECS (default "te local"), VARIANTS (default all_linear), RANKS (default 16), PROFILE (default
  # "base:0 all_linear:16"), DDP=1 (under Megatron's DDP), FP8=blockwise (the TE spec's FP8 base)
  te_env || return 1
  for spec in ${SPECS:-te local}; do
    local fp8=(); [ "$spec" = te ] && [ -n "${FP8:-}" ] && fp8=(--fp8 "$FP8")
    timeout 250 python3 "$REPO/bench/lora_overhead.py" --spec "$spec" --iters 10 --ranks ${RANKS:-16} \
      --variants ${VARIANTS:-all_linear} ${DDP:+--ddp} --profile ${PROFILE:-base:0 all_linear:16} --profile-top 30 \
      "${fp8[@]}" --out "$OUT/lora_profile_$spec.json" \
      > "$OUT/lora_profile_$spec.log" 2>&1
    grep -E "^\||^profile|Error" "$OUT/lora_profile_$spec.log"
  done
}

nemo_engines() {  # NeMo 2.7.3's llm.generate (TE spec) and Megatron's TE-spec load take our exports as they are
  # Inputs made here by: make run; bash bench/prepare_nemo_proof.sh. Needs TE in /tmp/te_site: the bring-up call of
  # that script's header ran on this warm machine just before (carry .gpu_wheels runs/gpu_proof).
  te_env || return 1
  local p=$REPO/runs/gpu_proof/nemo
  MASTER_PORT=29511 timeout 540 python3 "$REPO/bench/nemo_engines_check.py" nemo "$p/nemo_te" "$OUT/nemo_te.json" \
    --mcore "$p/mcore_te" > "$OUT/nemo_te.log" 2>&1 &
  local te_pid=$!
  MASTER_PORT=29512 timeout 540 python3 "$REPO/bench/nemo_engines_check.py" nemo "$p/nemo_local" \
    "$OUT/nemo_local.json" > "$OUT/nemo_local.log" 2>&1
  local rc_local=$?; wait "$te_pid"; local rc_te=$?
  tail -n 25 "$OUT/nemo_te.log"; tail -n 12 "$OUT/nemo_local.log"
  echo "rc te=$rc_te local=$rc_local"; [ "$rc_te" = 0 ] && [ "$rc_local" = 0 ]
}

v3_layers() {  # DeepSeek-V3 at real width, layer by layer + the paper projection (TE spec when the bring-up call
  # ran just before on this warm machine, else the TE-free spec): v3_layers.json, v3_layers.md
  te_env || echo "TE-free spec"
  timeout 500 python3 "$REPO/bench/v3_layers.py" measure --out "$OUT/v3_layers.json" --iters "${ITERS:-10}" --rounds "${ROUNDS:-1}" \
    > "$OUT/v3_layers.log" 2>&1; local rc=$?
  grep -vE "Warning|warn" "$OUT/v3_layers.log" | tail -n 30; return "$rc"
}

RS_BASE=/dev/shm/v2lite  # DeepSeek-V2-Lite as an HF directory (31 GB) in tmpfs: the 64 GiB disk holds the outputs

real_size_base() {  # the HF checkpoint of the published config, once per warm machine
  df -h /dev/shm /tmp | tee -a "$OUT/real_size_machine.txt"; free -g | tee -a "$OUT/real_size_machine.txt"
  [ -f "$RS_BASE/config.json" ] && return 0
  timeout 300 python3 "$REPO/bench/real_size.py" write --out "$RS_BASE" --tokenizer "$REPO/.real_size/tokenizer" \
    2>&1 | tee "$OUT/real_size_write.log" | tail -n 3
}

real_size_table() {  # the step table: frozen, MLALoRA nemo_official / all_linear r64, NeMo's LoRA (TE spec, seq 4096)
  te_env || return 1
  real_size_base || return 1
  # PROFILE="frozen all_linear_r64": also a torch profile of one more step of those variants (in the JSON);
  # ROUNDS=2: the variants in turn twice (medians over both); BATCH=2: two sequences per step
  timeout 480 python3 "$REPO/bench/real_size.py" table --base "$RS_BASE" --out "$OUT/real_size_table.json" \
    --iters "${ITERS:-8}" --batch "${BATCH:-1}" --rounds "${ROUNDS:-1}" ${PROFILE:+--profile $PROFILE} 2>&1 | tee "$OUT/real_size_table.log" \
    | grep -vE "Warning|warn|Adding lora|Unknown MLP" | tail -n 40
  return "${PIPESTATUS[0]}"
}

RS_RUN=/tmp/rs_run  # the finetune run (adapter, mcore export) on the disk
RS_FINETUNE=(model=deepseek_v2_lite "model.checkpoint=$RS_BASE" trainer=megatron trainer.devices=1
  trainer.expert_parallel=1 data.kind=jsonl "data.train=$REPO/nemo_mla_lora/data/upper_train.jsonl"
  "data.validation=$REPO/nemo_mla_lora/data/upper_validation.jsonl" data.seq_length=4096 trainer.global_batch_size=8
  trainer.micro_batch_size=1 trainer.max_steps=10 trainer.val_check_interval=10 trainer.limit_val_batches=2
  trainer.log_every_n_steps=1 trainer.checkpoint_every_n_steps=100 optim.warmup_steps=2 export=mcore
  export.verify=sample)

real_size_finetune() {  # recipes.finetune from the HF directory on the TE spec; the callback exports mcore, verifies
  te_env || return 1
  real_size_base || return 1
  rm -rf "$RS_RUN"
  python3 "$REPO/bench/measure.py" --out "$OUT/real_size_finetune.json" --log "$OUT/real_size_finetune.log" \
    -- timeout 560 python3 -m nemo_mla_lora.recipes.finetune "${RS_FINETUNE[@]}" "output_dir=$RS_RUN"
  local rc=$?
  grep -E "HF|loaded|loss|verif|export|Error|error" "$OUT/real_size_finetune.log" | tail -n 30
  collect "$RS_RUN" real_size_finetune; du -sh "$RS_RUN"/* 2>/dev/null; df -h /tmp | tail -1
  return "$rc"
}

real_size_check() {  # the unmerged model's logits (NeMo's stack), then the export in Megatron 0.15.3's own TE-spec
  # model at default strictness; real_size_check019 then loads it in 0.19.2's (its own site, with Transformer Engine)
  te_env || return 1
  timeout 240 python3 "$REPO/bench/real_size_check.py" expected --base "$RS_BASE" --adapter "$RS_RUN/adapter" \
    --out /tmp/rs_expected.pt > "$OUT/real_size_expected.log" 2>&1
  grep -vi warn "$OUT/real_size_expected.log" | tail -n 3
  real_size_load 0_15
}

real_size_load() {  # $1 = 0_15 | 0_19: the export in the TE-spec model of the Megatron on the path, at default
  # strictness, against real_size_check's /tmp/rs_expected.pt: real_size_load_mcore_$1.json and its log (with
  # real_size_floor's report where it ran first on this machine, in this call or an earlier one: the bound from it)
  local floor=(); [ -f "$RS_FLOOR" ] && floor=(--floor "$RS_FLOOR")
  timeout 420 python3 "$REPO/bench/real_size_check.py" load --export "$RS_RUN/export" --expected /tmp/rs_expected.pt \
    --out "$OUT/real_size_load_mcore_$1.json" "${floor[@]}" > "$OUT/real_size_load_$1.log" 2>&1; local rc=$?
  grep -vi warn "$OUT/real_size_load_$1.log" | tail -n 5; echo "rc $rc"; return "$rc"
}

RS_FLOOR=/tmp/rs_floor_mcore_0_15.json  # real_size_floor's report, outside $OUT: each call gets an empty $OUT

real_size_floor() {  # the same check on the base alone: an adapter=null mcore export of the HF base (no merge) in
  # Megatron 0.15.3's TE-spec model against the trainer's model without adapters: what the two stacks differ by
  te_env || return 1
  real_size_base || return 1
  rm -rf /tmp/rs_base_export
  timeout 300 python3 -m nemo_mla_lora.recipes.export "base=$RS_BASE" adapter=null output=/tmp/rs_base_export \
    format=mcore verify=none > "$OUT/real_size_floor_export.log" 2>&1 || { tail -n 5 "$OUT/real_size_floor_export.log"; return 1; }
  timeout 240 python3 "$REPO/bench/real_size_check.py" expected --base "$RS_BASE" --out /tmp/rs_expected_base.pt \
    > "$OUT/real_size_floor_expected.log" 2>&1 || { tail -n 5 "$OUT/real_size_floor_expected.log"; return 1; }
  timeout 300 python3 "$REPO/bench/real_size_check.py" load --export /tmp/rs_base_export \
    --expected /tmp/rs_expected_base.pt --out "$OUT/real_size_floor_mcore_0_15.json" > "$OUT/real_size_floor_load.log" 2>&1
  grep -vi warn "$OUT/real_size_floor_load.log" | tail -n 3; rm -rf /tmp/rs_base_export
  # written once loaded (its own "within" is against the fixed bound and means nothing here); kept for later calls
  cp "$OUT/real_size_floor_mcore_0_15.json" "$RS_FLOOR" 2>/dev/null || { echo "floor: no report"; return 1; }
}

real_size_check019() {  # after real_size_check (its /tmp/rs_expected.pt): the export in Megatron 0.19.2's TE spec
  te_env || return 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site019 \
    "$REPO"/.gpu_wheels019/megatron_core-0.19.2-*.whl || return 1
  PYTHONPATH="/tmp/site019:/tmp/te_site:$SITE" real_size_load 0_19
}

real_size_export() {  # the 31 GB export (verify=sample) against cp -r + sync of the same base onto the same disk, all
  # cores (the adapter: the finetune run's, or RS_ADAPTER_DIR)
  local cp_dir=/tmp/rs_cp out_dir=/tmp/rs_export adapter=${RS_ADAPTER_DIR:-$RS_RUN/adapter}
  rm -rf "$cp_dir" "$out_dir"; sync; df -h /tmp | tail -1 | tee -a "$OUT/real_size_machine.txt"
  python3 "$REPO/bench/measure.py" --sync --out "$OUT/real_size_cp.json" -- cp -r "$RS_BASE" "$cp_dir"
  rm -rf "$cp_dir"; sync
  # the wheels went in with --no-compile, so the first process to import a module compiles it (on the CPU machine
  # 12.8 s cold against 4.3 s for the export's imports); pip compiles at install time for a user: compile first
  python3 "$REPO/bench/measure.py" --out "$OUT/real_size_bytecode.json" -- python3 -c "$EXPORT_IMPORTS"
  OMP_NUM_THREADS=$(nproc) python3 "$REPO/bench/measure.py" --sync --out "$OUT/real_size_export.json" \
    --log "$OUT/real_size_export.log" -- timeout 400 python3 -m nemo_mla_lora.recipes.export "base=$RS_BASE" \
    "adapter=$adapter" "output=$out_dir" format=mcore verify=sample; local rc=$?
  grep -E "wrote|verif|Error" "$OUT/real_size_export.log" | tail -n 5
  cp "$out_dir/manifest.json" "$OUT/real_size_export_manifest.json" 2>/dev/null; rm -rf "$out_dir"
  return "$rc"
}

EXPORT_IMPORTS='import compileall, megatron.core.dist_checkpointing, nemo_mla_lora.recipes.export as e
import nemo_mla_lora.export.pipeline, nemo_mla_lora.runtime.parallel
compileall.compile_dir(e.__file__.rsplit("/", 2)[0], quiet=1)'

RS_ADAPTER=/dev/shm/v2lite_adapter  # an HF PEFT LoRA, rank 16, on every linear: the export's input without training

real_size_io() {  # no training, no TE: the base and RS_ADAPTER written here, then real_size_export
  python3 -c "import peft, accelerate, xxhash" 2>/dev/null || python3 -m pip install -q --no-index --no-deps \
    --no-compile --no-cache-dir --target "$SITE" "$REPO"/.real_size/extra/*.whl || return 1
  nproc | tee -a "$OUT/real_size_machine.txt"; df -h /dev/shm | tee -a "$OUT/real_size_machine.txt"
  if [ ! -f "$RS_BASE/config.json" ]; then
    rm -rf "$RS_ADAPTER"
    timeout 240 python3 "$REPO/bench/real_size.py" write --out "$RS_BASE" --tokenizer "$REPO/.real_size/tokenizer" \
      --adapter "$RS_ADAPTER" --adapter-rank 16 2>&1 | tee "$OUT/real_size_write.log" | tail -n 3
    [ -f "$RS_ADAPTER/adapter_config.json" ] || return 1
  fi
  RS_ADAPTER_DIR=$RS_ADAPTER real_size_export
}

real_size_engine() {  # the engine decodes the callback's export: batch 64, context 4,096, without and with 8 adapters
  timeout 500 python3 "$REPO/bench/decode_bench.py" --sections engine --export "$RS_RUN/export" --batch 64 \
    --prompt 4032 --steps 64 --out "$OUT/real_size_engine.json" 2>&1 | grep -vi warn | tail -n 5
}

megatron_release() {  # Megatron-Core 0.19.2's own specs load tiny mcore exports (TE and local names, with and without
  # q compression) unfixed and through models.megatron_release (inputs: .real_size/m019; TE bring-up in the same call)
  TE="$REPO/.te_carry" bash "$REPO/.te_carry/bring_up_te.sh" "$REPO"/.te_carry/slim/transformer_engine_cu13-*.whl \
    /tmp/te_site > "$OUT/te_bringup.log" 2>&1 || { tail -n 20 "$OUT/te_bringup.log"; return 1; }
  cp /tmp/te/dist/*.whl "$OUT/" 2>/dev/null
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site019 \
    "$REPO"/.gpu_wheels019/megatron_core-0.19.2-*.whl || return 1
  te_env || return 1
  PYTHONPATH="/tmp/site019:/tmp/te_site:$REPO" NVIDIA_TF32_OVERRIDE=0 timeout 240 python3 \
    "$REPO/bench/megatron_release_check.py" "$REPO/.real_size/m019" "$OUT/megatron_release_0_19.json" 2>&1 \
    | grep -E '^\{|Error' | cut -c1-400
}

beside() {  # two steps at once, the first in the background: a disk-bound step beside a GPU-bound one
  # (bash bench/run_gpu.sh beside real_size_export gluon_decode); the first's output follows the second's
  "$1" > "$OUT/beside_$1.log" 2>&1 & local pid=$!
  echo "== $2 (beside $1)"; "$2"; local rc2=$?
  wait "$pid"; local rc1=$?
  echo "== $1"; tail -n 30 "$OUT/beside_$1.log"; return $(( rc1 || rc2 ))
}

chain() {  # several steps in one call, in order, on one install (a step that fails does not stop the next):
  # bash bench/run_gpu.sh chain te_tests te_fp8
  local rc=0 step
  for step in "$@"; do echo "== $step ($SECONDS s)"; "$step" || rc=1; done
  return "$rc"
}

"$@"; rc=$?
rm -rf "$SMOKED"
# the device tool returns at most 8 files from $OUT: past that, the logs travel as one archive
cd "$OUT" && [ "$(ls | wc -l)" -gt 8 ] && tar czf logs.tar.gz -- *.log && rm -f -- *.log
exit "$rc"
