"""The export's peak memory follows its unit, not the layer: a checkpoint whose routed experts dominate
(two MoE layers of 64 experts, 100 MB of experts each, bf16, an HF PEFT LoRA on every linear) exported
with 8 MB units, in a fresh process, its resident-memory high-water mark against its memory right before
the export. Holding one layer as the old export did (experts flat and stacked, verify in fp32) is ~6x the
layer; streaming units is a few units plus one tensor. The numbers at real size: bench/README.md."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.bench import bench_module

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # spawns processes: more than 5 s a test
CHILD = """
import json, sys
from pathlib import Path
def kib(field):
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field)).split()[1])
def main():
    from nemo_mla_lora.runtime import parallel
    from nemo_mla_lora.export.pipeline import export
    parallel.init_megatron()
    base, fmt, out = sys.argv[1], sys.argv[2], sys.argv[3]
    import torch; torch.zeros(1) @ torch.zeros(1, 1)  # kernels loaded before the baseline
    import peft  # verify's reference reads the adapter with peft: its imports are not the export's memory
    before = kib("VmRSS")
    info = export(base, base + "/adapter", out, fmt=fmt, progress=False, budget=8 << 20)
    print(json.dumps({"growth_mib": (kib("VmHWM") - before) / 1024, "passed": info["verify"]["passed"],
                      "units": info["timing"]["units"]}))
if __name__ == "__main__":
    main()
"""


@pytest.fixture(scope="module")
def experts_heavy(tmp_path_factory):
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(
        vocab_size=512,
        hidden_size=512,
        intermediate_size=256,
        moe_intermediate_size=1024,
        num_hidden_layers=2,
        first_k_dense_replace=0,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=64,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        kv_lora_rank=64,
        q_lora_rank=96,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    out = tmp_path_factory.mktemp("experts_heavy") / "base"
    info = bench_module("export_scale").write_checkpoint(out, config, rank=8, shard_bytes=64 << 20)
    layer_experts_mib = 64 * 3 * 512 * 1024 * 2 / 2**20  # 192 MiB per layer
    assert info["bytes"] / 2**20 > 2 * layer_experts_mib
    return out, layer_experts_mib


@pytest.mark.parametrize("fmt", ["hf", "mcore"])
def test_export_peak_memory_is_units_not_layers(experts_heavy, tmp_path, fmt):
    base, layer_mib = experts_heavy
    # the same threads and malloc arenas on every machine: each extra thread's arena keeps its own slack,
    # which on a many-core CI machine added ~30 MiB to the same export
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", MALLOC_ARENA_MAX="2")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(base), fmt, str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["passed"] and result["units"] > 2 * 12  # each MoE layer is many units
    # a few 8 MB units in flight, one tensor in fp32, allocator slack, the pages of the files read:
    # under 3/4 of one layer's experts (holding the layer, as the old export did, was ~6x the layer)
    assert result["growth_mib"] < 0.75 * layer_mib, result
