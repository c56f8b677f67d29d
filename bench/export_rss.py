"""Peak RSS of the export step for a model and one several times larger (same layer shape, more layers).

    .venv/bin/python bench/export_rss.py [--layers 2 12] [--format hf]

Each export runs in a fresh process (``recipes.export``) and reports its peak RSS (ru_maxrss of the child).
Streaming means the difference in peak RSS is far below the difference in checkpoint size.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIMS = dict(hidden_size=512, ffn_hidden_size=1536, num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128,
            qk_head_dim=64, qk_pos_emb_head_dim=32, v_head_dim=64, num_moe_experts=8, moe_ffn_hidden_size=512,
            moe_shared_expert_intermediate_size=512, moe_router_num_groups=2, moe_router_group_topk=1,
            vocab_size=4096)

MAKE = """
import sys, json, torch
from nemo_mla_lora import parallel, checkpoint
from nemo_mla_lora.models.tiny import build_model, tiny_mla_config
from nemo_mla_lora.mla_spec import MLASpec
from nemo_mla_lora.peft import MLALoRA
from nemo_mla_lora.peft.state import randomize_b
def main():
    parallel.init_megatron()
    layers, out = int(sys.argv[1]), sys.argv[2]
    cfg = tiny_mla_config(num_layers=layers, **json.loads(sys.argv[3]))
    model = build_model(cfg); spec = MLASpec.from_megatron(cfg)
    checkpoint.save_base(model, spec, out + "/base")
    peft = MLALoRA(placement="all_linear", dim=16, alpha=32)
    model = peft(model); randomize_b(model, std=0.01)
    checkpoint.save_adapter(model, peft, spec, out + "/adapter")
if __name__ == "__main__":
    main()
"""


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20




def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs=2, default=[2, 12])
    ap.add_argument("--format", default="hf")
    args = ap.parse_args()
    rows = []
    for layers in args.layers:
        work = Path(tempfile.mkdtemp(prefix=f"rss{layers}_"))
        subprocess.run([sys.executable, "-c", MAKE, str(layers), str(work), json.dumps(DIMS)], check=True,
                       capture_output=True, cwd=ROOT)
        # one child per measurement so ru_maxrss of RUSAGE_CHILDREN is this export's peak
        code = (f"import resource, subprocess, sys; subprocess.run([sys.executable, '-m', 'nemo_mla_lora.recipes.export', "
                f"'base={work}/base', 'adapter={work}/adapter', 'output={work}/export', 'format={args.format}'], check=True, "
                f"capture_output=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
        peak = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                    cwd=ROOT).stdout.split()[-1])
        rows.append({"layers": layers, "base_mib": round(dir_mb(work / "base"), 1), "peak_rss_mib": round(peak, 1)})
        print(json.dumps(rows[-1]), flush=True)
    size_ratio = rows[1]["base_mib"] / rows[0]["base_mib"]
    grow = rows[1]["peak_rss_mib"] - rows[0]["peak_rss_mib"]
    print(json.dumps({"format": args.format, "size_ratio": round(size_ratio, 2),
                      "checkpoint_growth_mib": round(rows[1]["base_mib"] - rows[0]["base_mib"], 1),
                      "peak_rss_growth_mib": round(grow, 1)}))


if __name__ == "__main__":
    main()
