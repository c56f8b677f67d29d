"""One DeepSeek-V2-Lite MoE layer (64 routed experts of 1,408, 2 shared, top-6, hidden 2,048) at decode batch
sizes: Megatron's own MoE layer (router, allgather dispatcher, ``SequentialMLP``: one GEMM chain per expert, the
counts read back to the host) against the engine's ``GroupedMoE`` (``inference/moe.py``: the same router and shared
experts, the routed experts as two grouped GEMMs, no host read), same weights, same process; outputs checked equal
first.

    python bench/moe_decode.py [--device cuda --dtype bfloat16] [--batches 1 8 64] [--out moe_decode.json]
    ... --config CONFIG_JSON   # another HF config of the family (the smoke test's tiny one)

Times: the median of ``--iters`` calls after 3 of warm-up (CUDA: synchronized per call), ms per layer call on
[1, b, hidden] (one decode step of b rows).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parents[1] / "nemo_mla_lora" / "models" / "configs" / "deepseek_v2_lite.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build(device: str, dtype: torch.dtype, config_json: Path = CONFIG):
    """(spec, the MoE layer) of a 2-layer model of the config (dense + MoE), Megatron's local spec as the engine
    builds it."""
    from nemo_mla_lora.arch import hf_config
    from nemo_mla_lora.models.from_spec import CPU_SAFE, config_from_spec
    from nemo_mla_lora.models.layer_spec import local_mla_block_spec
    from nemo_mla_lora.models.tiny import build_model
    from nemo_mla_lora.runtime import parallel

    parallel.init_megatron()
    raw = json.loads(Path(config_json).read_text())
    raw.update(num_hidden_layers=2, first_k_dense_replace=1, vocab_size=1024)
    spec = hf_config.spec_from_hf(raw)
    torch.manual_seed(0)
    config = config_from_spec(spec, dtype, **CPU_SAFE, transformer_layer_spec=local_mla_block_spec)
    model = build_model(config).to(device).eval()
    return spec, model.decoder.layers[1].mlp


def time_ms(fn, x, iters: int) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    runs = []
    for i in range(3 + iters):
        sync()
        start = time.perf_counter()
        fn(x)
        sync()
        if i >= 3:
            runs.append((time.perf_counter() - start) * 1e3)
    return statistics.median(runs)


@torch.no_grad()
def main(argv=None) -> dict:
    from nemo_mla_lora.inference.moe import GroupedMoE

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out")
    p.add_argument("--config", default=str(CONFIG), help="an HF config.json (default: DeepSeek-V2-Lite's)")
    args = p.parse_args(argv)
    spec, mlp = build(args.device, DTYPES[args.dtype], args.config)
    grouped = GroupedMoE(mlp)
    tol = 1e-4 if args.dtype == "float32" else 3e-2
    device = torch.device(args.device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": args.dtype, "threads": torch.get_num_threads(), "rows": []}  # fmt: skip
    for b in args.batches:
        x = torch.randn(1, b, spec.hidden_size, device=device, dtype=DTYPES[args.dtype])  # [s=1, b, hidden]
        torch.testing.assert_close(grouped(x)[0], mlp(x)[0], atol=tol, rtol=tol)
        row = {"batch": b, "megatron_ms": time_ms(mlp, x, args.iters), "grouped_ms": time_ms(grouped, x, args.iters)}
        row["speedup"] = row["megatron_ms"] / row["grouped_ms"]
        result["rows"].append(row)
        print(f"batch {b}: Megatron's MoE layer {row['megatron_ms']:.2f} ms, GroupedMoE {row['grouped_ms']:.2f} ms, "
              f"x{row['speedup']:.2f}", flush=True)  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
