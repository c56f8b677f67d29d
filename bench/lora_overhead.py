"""What LoRA costs per training step on one DeepSeek-V3-shaped layer: time and peak memory.

    python bench/lora_overhead.py --out lora_overhead.json             # GPU: V3 dims, bf16, seq 4096
    python bench/lora_overhead.py --dims tiny --seq 64 --iters 2       # CPU smoke run

One decoder layer with DeepSeek-V3's true attention dims (hidden 7168, 128 heads, q_lora_rank 1536,
kv_lora_rank 512, qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128) and its MoE shape with
fewer routed experts (16, top-8, 8 groups top-4, shared expert), built from our TE-free layer spec.
Baseline: the frozen layer's forward + backward to the input gradient (what the base costs inside LoRA
training). Each variant: the same layer (same seed) with MLALoRA on one target or one placement, forward
+ backward to the input and the adapter gradients. B != 0 (small random), so no GEMM runs on zeros.
Timing: CUDA events around each step, warm-up first, median of --iters. Memory: peak allocated during
the step minus what was allocated before it (activations, gradients, workspace), and the total peak.
"""

import argparse
import json
import statistics
import sys
import time

import torch

V3_LAYER = dict(hidden_size=7168, ffn_hidden_size=18432, num_attention_heads=128, q_lora_rank=1536,
                kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128, num_moe_experts=16,
                moe_ffn_hidden_size=2048, moe_shared_expert_intermediate_size=2048, moe_router_topk=8,
                moe_router_num_groups=8, moe_router_group_topk=4, vocab_size=129280,
                original_max_position_embeddings=4096, rotary_scaling_factor=40.0)
TINY_LAYER = dict(moe_router_num_groups=None, moe_router_group_topk=None)
TARGETS = ("linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj", "linear_proj",
           "linear_fc1", "linear_fc2")
PLACEMENTS = ("nemo_official", "all_linear", "safe", "kv_up", "down_only")
# Two frozen baselines: Megatron's SequentialMLP, and the same experts through LoRASequentialMLP's path
# (base GEMMs into one output, one activation over all tokens), so a LoRA ratio cannot flatter itself
# with what that restructuring saves on the base.
BASES = ("base", "base_grouped")


def build_layer(dims: str, seq: int, dtype, seed: int, experts: int | None = None, spec: str = "local"):
    """One MoE decoder layer (layer_number 1) wrapped so module names read ``layer.self_attention...``.
    ``spec``: ``local`` (TE-free, SequentialMLP experts) or ``te`` (Megatron's TE spec as NeMo builds it,
    routed experts as TE grouped GEMMs; needs Transformer Engine)."""
    from megatron.core.transformer.spec_utils import build_module

    from nemo_mla_lora.runtime import cpu_compat
    from nemo_mla_lora.models.layer_spec import local_mla_block_spec, te_mla_block_spec
    from nemo_mla_lora.models.from_spec import CPU_SAFE
    from nemo_mla_lora.models.tiny import mla_config

    shape = dict(V3_LAYER if dims == "v3" else TINY_LAYER)
    if experts:
        shape["num_moe_experts"] = experts
    if spec == "te":
        shape["moe_grouped_gemm"] = True
    else:  # the TE-free model as it is built where TE is absent, also where TE imports (same table either way)
        shape.update({k: v for k, v in CPU_SAFE.items() if k != "use_cpu_initialization"})
    config = mla_config(dtype, **shape, num_layers=1, moe_layer_freq=[1], seq_length=seq,
                        max_position_embeddings=seq, use_cpu_initialization=cpu_compat.cuda_absent())
    cpu_compat.seed(seed)
    holder = torch.nn.Module()
    block = (te_mla_block_spec if spec == "te" else local_mla_block_spec)(config)
    holder.layer = build_module(block.layer_specs[0], config=config, layer_number=1)
    return holder.to(device()), config


def device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def with_lora(holder, variant: str, rank: int):
    from nemo_mla_lora.peft import MLALoRA
    from nemo_mla_lora.peft.grouped_experts import group_experts
    from nemo_mla_lora.peft.state import randomize_b

    if variant in BASES:
        for p in holder.parameters():
            p.requires_grad_(False)
        if variant == "base_grouped":  # the frozen experts through the adapters' grouped path
            group_experts(holder, frozen_too=True)
        return holder
    kwargs = dict(placement=variant) if variant in PLACEMENTS else dict(placement=None, target_modules=[variant])
    model = MLALoRA(dim=rank, alpha=rank, **kwargs)(holder)
    randomize_b(model, std=1e-3)  # B != 0 on every adapter (TE grouped experts' lora_b{e} too)
    return model


def step(model, x, grad):
    out, _ = model.layer(x, attention_mask=None)  # [s, b, h]
    out.backward(grad)


def timed_steps(model, x, grad, warmup: int, iters: int) -> list[float]:
    cuda = x.is_cuda
    times = []
    for i in range(warmup + iters):
        x.grad = None
        model.zero_grad(set_to_none=True)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(model, x, grad)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            step(model, x, grad)
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    return times


def prepare(args, variant: str, rank: int):
    """(model with ``variant`` adapters, input x [s, b, hidden] requiring grad, output gradient), seeded."""
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    holder, config = build_layer(args.dims, args.seq, dtype, args.seed, args.experts, args.spec)
    model = with_lora(holder, variant, rank)
    gen = torch.Generator(device=device()).manual_seed(args.seed)
    x = torch.randn(args.seq, args.batch, config.hidden_size, device=device(), dtype=dtype,
                    generator=gen).requires_grad_()
    grad = torch.randn(x.shape, device=device(), dtype=dtype, generator=gen)
    return model, x, grad


def measure(args, variant: str, rank: int) -> dict:
    model, x, grad = prepare(args, variant, rank)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if x.is_cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = timed_steps(model, x, grad, args.warmup, args.iters)
    row = {"variant": variant, "rank": None if variant in BASES else rank, "trainable": trainable,
           "median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}
    if x.is_cuda:
        row["step_peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        row["total_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    del model, x, grad
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def profile(args, variant: str, rank: int, top: int = 12, steps: int = 2) -> dict:
    """One step's CPU time, GPU kernel time and kernel launches, and the top ops (what a ratio is made of)."""
    model, x, grad = prepare(args, variant, rank)
    timed_steps(model, x, grad, 2, 1)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if x.is_cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        timed_steps(model, x, grad, 0, steps)
    events = prof.key_averages()
    from torch.autograd import DeviceType

    device_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)  # kernels
    cpu_us = sum(e.self_cpu_time_total for e in events)
    launches = sum(e.count for e in events if "LaunchKernel" in e.key or "LaunchCooperativeKernel" in e.key)
    key = "cuda_time_total" if x.is_cuda else "cpu_time_total"
    return {"cpu_ms_per_step": cpu_us / 1e3 / steps, "gpu_kernel_ms_per_step": device_us / 1e3 / steps,
            "launches_per_step": launches / steps, "table": events.table(sort_by=key, row_limit=top)}


def table(rows: list[dict], base_ms: dict) -> str:
    """Ratios against the median of each baseline's interleaved runs (``base_ms``: variant -> ms)."""
    base_mib = {r["variant"]: r.get("step_peak_mib") for r in rows if r["variant"] in BASES}
    lines = ["| variant | rank | trainable | step ms (median) | x base | x base_grouped | step peak MiB | x base |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = r.get("step_peak_mib")
        mib = "-" if mem is None else f"{mem:,.0f}"
        mem_ratio = "-" if mem is None else f"{mem / base_mib['base']:.3f}"
        lines.append(f"| {r['variant']} | {r['rank'] or '-'} | {r['trainable']:,} | {r['median_ms']:.2f} | "
                     f"{r['median_ms'] / base_ms['base']:.3f} | {r['median_ms'] / base_ms['base_grouped']:.3f} | "
                     f"{mib} | {mem_ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dims", choices=("v3", "tiny"), default="v3")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1, help="micro-batch: tokens per step = seq * batch")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--experts", type=int, default=None, help="routed experts (default: 16 for v3 dims)")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64], help="LoRA ranks (peft.dim) to measure")
    p.add_argument("--spec", choices=("local", "te"), default="local",
                   help="te: Megatron's TE layer spec, routed experts as TE grouped GEMMs (needs Transformer Engine)")
    p.add_argument("--variants", nargs="+", default=list(TARGETS + PLACEMENTS))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--profile", nargs="*", default=[], help="variant:rank pairs to profile after the table")
    p.add_argument("--profile-top", type=int, default=12, help="ops per profile table")
    p.add_argument("--legacy", action="store_true",
                   help="the adapters before the fused path: three autograd ops per linear, one chain per expert")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.legacy:
        from nemo_mla_lora.peft import mla_lora
        from nemo_mla_lora.peft.adapter import MLALoRAAdapter

        MLALoRAAdapter.fused = lambda self, base: False
        mla_lora.group_experts = lambda model, frozen_too=False: 0

    from nemo_mla_lora.runtime import parallel

    parallel.init_megatron(seed=args.seed)
    rows = [measure(args, b, 0) for b in BASES]
    bases = {b: [r["median_ms"]] for b, r in zip(BASES, rows)}  # again between ranks and at the end: the noise
    for rank in args.ranks:
        for variant in args.variants:
            rows.append(measure(args, variant, rank))
            print(f"{variant} r={rank}: {rows[-1]['median_ms']:.2f} ms", file=sys.stderr, flush=True)
        for b in BASES:
            bases[b].append(measure(args, b, 0)["median_ms"])
    base_ms = {b: statistics.median(v) for b, v in bases.items()}
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"card": card, "dims": args.dims, "seq": args.seq, "batch": args.batch, "dtype": args.dtype,
              "experts": args.experts, "legacy": args.legacy,
              "rows": rows, "base_runs_ms": bases, "base_ms": base_ms, "torch": torch.__version__}
    result["profiles"] = {spec: profile(args, spec.split(":")[0], int(spec.split(":")[1]), args.profile_top)
                          for spec in args.profile}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    runs = "; ".join(f"{b} {', '.join(f'{t:.2f}' for t in v)}" for b, v in bases.items())
    print(f"card: {card}; dims {args.dims}, experts {args.experts or 'default'}, seq {args.seq} x batch {args.batch}, "
          f"{args.dtype}; baseline runs (ms): "
          f"{runs}; ratios against their medians")
    print(table(rows, base_ms))
    for spec, prof in result["profiles"].items():
        print(f"\nprofile {spec}: CPU {prof['cpu_ms_per_step']:.1f} ms, GPU kernels "
              f"{prof['gpu_kernel_ms_per_step']:.1f} ms, {prof['launches_per_step']:.0f} launches per step\n"
              f"{prof['table']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
