#!/usr/bin/env bash
# Here (no GPU), after `make run`: the inputs of the NeMo/TE engines proof on the GPU machine.
#   runs/gpu_proof/nemo/{nemo_te, nemo_local, mcore_te}   the default run exported three ways
#   runs/gpu_proof/nemo/expected.pt                       recipes.generate on nemo_te: greedy tokens + logits
#   .te_carry/   Transformer Engine 2.20.2 for one call (slim sm_90 core wheel: scripts/gpu/te); put the torch
#                extension wheel a bring-up returns under $OUT/built/ in .te_carry/built/ and the next skips its build
# Then two device calls, the second within 30 s of the first (the machine keeps /tmp while warm):
#   carry [".te_carry"]                         TE=.te_carry bash .te_carry/bring_up_te.sh .te_carry/slim/*.whl /tmp/te_site
#   carry [".gpu_wheels", "runs/gpu_proof"]     bash bench/run_gpu.sh nemo_engines
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_WHEELS:-}" ] || bash bench/prepare_gpu.sh  # NeMo's wheels + this tree's wheel (the names=local context imports our layer spec)
if [ ! -f .te_carry/slim/transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl ]; then
  [ -d .te ] || bash scripts/gpu/te/fetch_te.sh .te
  mkdir -p .te_carry/slim && cp -r .te/whl .te/bring_up_te.sh .te/smoke.py .te/transformer_engine_torch-2.20.2.tar.gz .te_carry/
  python3 scripts/gpu/te/slim_wheel.py .te/core/transformer_engine_cu13-2.20.2-*.whl \
    .te_carry/slim/transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl
fi
cp scripts/gpu/te/bring_up_te.sh .te_carry/  # this tree's bring-up, not the one copied when the carry was made
P=runs/gpu_proof/nemo; rm -rf "$P"; mkdir -p "$P"
for f in "nemo te" "nemo local" "mcore te"; do
  set -- $f
  .venv/bin/python -m nemo_mla_lora.recipes.export base=runs/finetune/base adapter=runs/finetune/adapter \
    "output=$P/$1_$2" "format=$1" "names=$2" 2>&1 | grep -E "wrote|Error" || true
done
.venv/bin/python - "$P/prompt_ids.json" <<'PY'
import json, sys
prompts = ["upper: abc =", "upper: csi =", "upper: nwnfqjd ="]
json.dump([list(p.encode()) for p in prompts], open(sys.argv[1], "w"))  # no BOS: llm.generate 2.7.3 adds none
PY
.venv/bin/python -m nemo_mla_lora.recipes.generate "checkpoint=$P/nemo_te" "prompt_ids_file=$P/prompt_ids.json" \
  max_new_tokens=8 "dump_logits=$P/expected_ids.pt" 2>&1 | grep -vi warn | tail -4
.venv/bin/python - "$P" <<'PY'  # the dump with the prompts as text (llm.generate takes text)
import sys, torch
rows = torch.load(f"{sys.argv[1]}/expected_ids.pt")
for r in rows:
    r["prompt"] = bytes(t for t in r["tokens"][: r["prompt_logits"].shape[0]].tolist()).decode()
torch.save(rows, f"{sys.argv[1]}/expected.pt")
PY
du -sh .gpu_wheels .te_carry "$P"
