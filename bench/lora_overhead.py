"""What LoRA costs per training step on one DeepSeek-V3-shaped layer: time and peak memory.

    python bench/lora_overhead.py --out lora_overhead.json             # GPU: V3 dims, bf16, seq 4096
    python bench/lora_overhead.py --dims tiny --seq 64 --iters 2       # CPU smoke run

One decoder layer with DeepSeek-V3's true attention dims (hidden 7168, 128 heads, q_lora_rank 1536,
kv_lora_rank 512, qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128) and its MoE shape with
fewer routed experts (16, top-8, 8 groups top-4, shared expert), built from our TE-free layer spec (``--spec te``:
Megatron's TE spec as NeMo builds it).
Baseline: the frozen layer's forward + backward to the input gradient (what the base costs inside LoRA
training). Each variant: the same layer (same seed) with MLALoRA on one target or one placement, forward
+ backward to the input and the adapter gradients. B != 0 (small random), so no GEMM runs on zeros.
Timing: CUDA events around each step, warm-up first, median of --iters. Memory: peak allocated during
the step minus what was allocated before it (activations, gradients, workspace), and the total peak.

FP8 frozen base (``--fp8 blockwise|tensorwise``, ``--spec te``, a CUDA GPU with Transformer Engine): the layer's
config gets ``fp8`` / ``fp8_recipe`` / ``fp8_param=True`` and is built inside Megatron's ``fp8_model_init`` context
(what ``TransformerBlock`` does per layer: TE's linears then hold their weights as FP8 tensors), and each forward
runs inside Megatron's ``fp8_autocast`` context for the layer (what ``TransformerBlock.forward`` enters per layer for
these recipes), backward outside it, as Megatron's schedules run it. Adapters stay in ``--dtype``.

    python bench/lora_overhead.py --spec te --fp8 blockwise --summary summary.json    # GPU: the bf16/FP8 cost table

``--summary PATH`` (``lora_summary.py``): the frozen base, MLALoRA ``nemo_official`` r16, ``all_linear`` r16 and r64,
and NeMo's own ``llm.peft.LoRA`` on ``nemo_official``'s targets (``--variants nemo_lora`` in the table), each on the
``--dtype`` base and (with ``--fp8``) on the FP8 base, in one process; PATH gets ``card`` and ``step_ms`` /
``peak_gib`` maps keyed ``<variant>_<bf16|fp8>``.
"""

import argparse
import contextlib
import gc
import json
import os
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
# --fp8 -> (TransformerConfig.fp8, fp8_recipe). blockwise: DeepSeek-V3's own recipe (1x128 activation and 128x128
# weight scales, E4M3 in both passes); tensorwise: current per-tensor scaling, E4M3 forward and E5M2 gradients
# (NeMo's bf16_with_fp8_current_scaling_mixed).
FP8 = {"blockwise": ("e4m3", "blockwise"), "tensorwise": ("hybrid", "tensorwise")}


def fp8_refusal(fp8: str, spec: str) -> str | None:
    """Why ``--fp8 fp8`` cannot run here (None: it can, or it is ``none``). Checked before anything is built."""
    if fp8 == "none":
        return None
    if not torch.cuda.is_available():
        return f"--fp8 {fp8}: FP8 needs a CUDA GPU with Transformer Engine, and this machine has no CUDA device"
    from nemo_mla_lora.runtime import te_compat

    if te_compat.transformer_engine_absent():
        return f"--fp8 {fp8}: FP8 needs Transformer Engine, and transformer_engine.pytorch does not import here"
    if spec != "te":
        return f"--fp8 {fp8}: FP8 GEMMs are Transformer Engine's: use --spec te (got --spec {spec})"
    if torch.cuda.get_device_capability() < (8, 9):
        return f"--fp8 {fp8}: FP8 GEMMs need compute capability 8.9 or newer; {torch.cuda.get_device_name()} has " \
               f"{torch.cuda.get_device_capability()}"
    return None


def fp8_context(config, init: bool = False):
    """Megatron's own FP8 context for layer 1 (``get_fp8_context``): ``fp8_model_init`` while it is built
    (``init``; ``TransformerBlock`` builds each layer in it), ``fp8_autocast`` around its forward (what
    ``TransformerBlock.forward`` enters per layer for the blockwise and tensorwise recipes). A null context
    without FP8."""
    if not config.fp8:
        return contextlib.nullcontext()
    from megatron.core.fp8_utils import get_fp8_context

    return get_fp8_context(config, 0, is_init=init)


def build_layer(dims: str, seq: int, dtype, seed: int, experts: int | None = None, spec: str = "local",
                fp8: str = "none"):
    """One MoE decoder layer (layer_number 1) wrapped so module names read ``layer.self_attention...``.
    ``spec``: ``local`` (TE-free, SequentialMLP experts) or ``te`` (Megatron's TE spec as NeMo builds it,
    routed experts as TE grouped GEMMs; needs Transformer Engine). ``fp8``: ``none`` or a key of ``FP8``:
    the frozen weights held in FP8 (``fp8_param``), the GEMMs in FP8 under ``fp8_context``."""
    from megatron.core.transformer.spec_utils import build_module

    from nemo_mla_lora.models.from_spec import CPU_SAFE
    from nemo_mla_lora.models.layer_spec import local_mla_block_spec, te_mla_block_spec
    from nemo_mla_lora.models.tiny import mla_config
    from nemo_mla_lora.runtime import cpu_compat

    shape = dict(V3_LAYER if dims == "v3" else TINY_LAYER)
    if experts:
        shape["num_moe_experts"] = experts
    if spec == "te":
        shape["moe_grouped_gemm"] = True
    else:  # the TE-free model as it is built where TE is absent, also where TE imports (same table either way)
        shape.update({k: v for k, v in CPU_SAFE.items() if k != "use_cpu_initialization"})
    if fp8 != "none":
        shape.update(fp8=FP8[fp8][0], fp8_recipe=FP8[fp8][1], fp8_param=True)
    config = mla_config(dtype, **shape, num_layers=1, moe_layer_freq=[1], seq_length=seq,
                        max_position_embeddings=seq, use_cpu_initialization=cpu_compat.cuda_absent())
    cpu_compat.seed(seed)
    holder = torch.nn.Module()
    block = (te_mla_block_spec if spec == "te" else local_mla_block_spec)(config)
    with fp8_context(config, init=True):
        holder.layer = build_module(block.layer_specs[0], config=config, layer_number=1)
    return holder.to(device()), config


def device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def with_lora(holder, variant: str, rank: int):
    from nemo_mla_lora.peft import MLALoRA
    from nemo_mla_lora.peft.grouped_experts import group_experts
    from nemo_mla_lora.peft.state import randomize_b

    if variant in ("nemo_lora", "nemo_lora_fused"):
        return nemo_lora(holder, rank, fused=variant == "nemo_lora_fused")
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


def nemo_lora(holder, rank: int, fused: bool = False):
    """NeMo's own ``llm.peft.LoRA`` (alpha = rank, no dropout) on the modules MLALoRA ``nemo_official`` wraps, B != 0
    (NeMo's ``linear_out``, zero at start). ``fused`` (``nemo_lora_fused``): NeMo's ``TEFusedLoRALinear``, its LoRA
    through Transformer Engine's op fuser (the base's and the adapter's GEMMs as ``te.ops`` with beta = 1 sums), which
    ``LoRA.transform`` picks for a TE linear whose config has ``use_transformer_engine_op_fuser`` at TP 1; set here on
    the layer's config (megatron-core 0.15 has no such field; later versions do), refused unless every target got it."""
    from nemo.collections.llm import fn
    from nemo.collections.llm.peft import LoRA
    from nemo.collections.llm.peft import lora as nemo_lora_module
    from nemo.collections.llm.peft.utils import ParallelLinearAdapter

    from nemo_mla_lora.peft import MLALoRA

    targets = list(MLALoRA(placement="nemo_official").resolve(holder))
    expected = sum(name.rsplit(".", 1)[-1] in targets for name, _ in holder.named_modules())
    holder.requires_grad_(False)  # what LoRA.__call__ does to NeMo's own model (freeze), on a bare one
    if fused:
        holder.layer.config.use_transformer_engine_op_fuser = True  # every module of the layer shares this config
    model = fn.walk(holder, LoRA(target_modules=targets, dim=rank, alpha=rank, dropout=0.0).transform)
    adapters = [m for m in model.modules() if isinstance(m, ParallelLinearAdapter)]
    if len(adapters) != expected:
        raise RuntimeError(f"NeMo's LoRA wrapped {len(adapters)} modules, expected {expected} ({targets})")
    if fused:
        fused_cls = getattr(nemo_lora_module, "TEFusedLoRALinear", None)
        wrapped = 0 if fused_cls is None else sum(isinstance(m, fused_cls) for m in model.modules())
        if wrapped != expected:
            why = "NeMo defines no TEFusedLoRALinear here (it needs Transformer Engine >= 2.7)" if fused_cls is None \
                else "the others are plain LoRALinear: TE linears at TP 1 only"
            raise RuntimeError(f"nemo_lora_fused: {wrapped} of {expected} targets got NeMo's TEFusedLoRALinear; {why}")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in adapters:
            w = a.linear_out.weight
            w.copy_(torch.randn(w.shape, generator=gen) * 1e-3)
    return model


def megatron_ddp(model, config):
    """The model under Megatron's DDP as NeMo's ``llm.finetune`` wraps it (MegatronStrategy's default DDP config,
    bf16-mixed's ``grad_reduce_in_fp32``): trainable parameters' gradients go to fp32 ``main_grad`` buffers through
    DDP's hooks (or inside the GEMM where a layer fuses the accumulation) and are all-reduced at the step's end."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(check_for_nan_in_grad=True, grad_reduce_in_fp32=True)
    return DistributedDataParallel(config, ddp_config, module=model)


def release(model) -> None:
    """Lets a DDP-wrapped model be freed: each hook Megatron's DDP registers on a gradient accumulator holds the DDP
    object, and the accumulators (C++ nodes, invisible to Python's cycle collector) are held by the DDP object's
    ``grad_accs``, so without this every measured variant stays allocated (its fp32 ``main_grad`` buffers too)."""
    accs = getattr(model, "grad_accs", None)
    if accs is not None:
        accs.clear()


def step(model, x, grad):
    layer = getattr(model, "module", model).layer  # under DDP: its module
    with fp8_context(layer.config):
        out, _ = layer(x, attention_mask=None)  # [s, b, h]
    out.backward(grad)
    if hasattr(model, "finish_grad_sync"):  # DDP: the gradients' all-reduce, as the trainer's step ends
        model.finish_grad_sync()


def timed_steps(model, x, grad, warmup: int, iters: int) -> list[float]:
    """ms per step; Python's automatic garbage collector off meanwhile (one collection first), as training runs
    with ``trainer.gc_interval`` (NeMo's GarbageCollectionCallback): a full collection over this process's
    objects would otherwise land in whichever step crosses its threshold."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _timed_steps(model, x, grad, warmup, iters)
    finally:
        if was_enabled:
            gc.enable()


def _timed_steps(model, x, grad, warmup: int, iters: int) -> list[float]:
    cuda = x.is_cuda
    times = []
    for i in range(warmup + iters):
        x.grad = None
        if hasattr(model, "zero_grad_buffer"):  # DDP: the trainer zeroes its main_grad buffers each step
            model.zero_grad_buffer()
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


def prepare(args, variant: str, rank: int, fp8: str | None = None):
    """(model with ``variant`` adapters, input x [s, b, hidden] requiring grad, output gradient), seeded; the base
    in FP8 per ``fp8`` (default ``args.fp8``)."""
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    fp8 = args.fp8 if fp8 is None else fp8
    holder, config = build_layer(args.dims, args.seq, dtype, args.seed, args.experts, args.spec, fp8)
    model = with_lora(holder, variant, rank)
    check_precision(model, fp8, dtype)
    if getattr(args, "ddp", False) and any(p.requires_grad for p in model.parameters()):
        model = megatron_ddp(model, config)
    gen = torch.Generator(device=device()).manual_seed(args.seed)
    x = torch.randn(args.seq, args.batch, config.hidden_size, device=device(), dtype=dtype,
                    generator=gen).requires_grad_()
    grad = torch.randn(x.shape, device=device(), dtype=dtype, generator=gen)
    return model, x, grad


def fp8_weights(model) -> list[str]:
    """The parameters held as FP8 tensors (Megatron's ``is_float8tensor``: TE's ``QuantizedTensor``)."""
    from megatron.core.fp8_utils import is_float8tensor

    return [n for n, p in model.named_parameters() if is_float8tensor(p)]


def check_precision(model, fp8: str, dtype) -> None:
    """Raises unless an FP8 base holds FP8 weights and every trainable parameter is a plain ``dtype`` tensor (the
    adapters are not quantized)."""
    from megatron.core.fp8_utils import is_float8tensor

    if fp8 != "none" and not fp8_weights(model):
        raise RuntimeError(f"--fp8 {fp8}: no parameter of the layer is an FP8 tensor (fp8_param had no effect)")
    bad = {n: (type(p).__name__, p.dtype) for n, p in model.named_parameters()
           if p.requires_grad and (is_float8tensor(p) or p.dtype != dtype)}
    if bad:
        raise RuntimeError(f"trainable parameters not plain {dtype}: {bad}")


@contextlib.contextmanager
def grouped_adds(variant: str):
    """``<variant>@torchadd``: the grouped experts' adapter sums through ``torch._grouped_mm`` and an add instead of
    ``peft/grouped_add``'s one launch (the A/B of that kernel in one process); yields the plain variant name."""
    from nemo_mla_lora.peft import lora_around

    name, _, option = variant.partition("@")
    if option not in ("", "torchadd"):
        raise SystemExit(f"variant {variant!r}: the only option after '@' is 'torchadd'")
    saved, lora_around.GROUPED_ADD = lora_around.GROUPED_ADD, option != "torchadd"
    try:
        yield name
    finally:
        lora_around.GROUPED_ADD = saved


def measure(args, variant: str, rank: int, fp8: str | None = None) -> dict:
    with grouped_adds(variant) as name:
        row = _measure(args, name, rank, fp8)
    return {**row, "variant": variant}


def _measure(args, variant: str, rank: int, fp8: str | None = None) -> dict:
    model, x, grad = prepare(args, variant, rank, fp8)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    held = len(fp8_weights(model))
    if x.is_cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = timed_steps(model, x, grad, args.warmup, args.iters)
    row = {"variant": variant, "rank": None if variant in BASES else rank, "trainable": trainable,
           "fp8_weights": held, "median_ms": statistics.median(times), "min_ms": min(times),
           "max_ms": max(times)}
    if x.is_cuda:
        row["resident_mib"] = before / 2**20
        row["step_peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        row["total_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    release(model)
    del model, x, grad
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def profile(args, variant: str, rank: int, top: int = 12, steps: int = 2) -> dict:
    """One step's CPU time, GPU kernel time and kernel launches, and the top ops (what a ratio is made of)."""
    with grouped_adds(variant) as name:
        model, x, grad = prepare(args, name, rank)
        try:
            return _profile(model, x, grad, top, steps)
        finally:
            release(model)


def _profile(model, x, grad, top: int, steps: int) -> dict:
    timed_steps(model, x, grad, 2, 1)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if x.is_cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        timed_steps(model, x, grad, 0, steps)
    return summarize(prof, steps, x.is_cuda, top)


def summarize(prof, steps: int, cuda: bool, top: int) -> dict:
    """A finished ``torch.profiler.profile`` of ``steps`` steps -> per step: host (CPU) ms, GPU kernel ms, kernel
    launches, and the ``top`` ops by device time (CPU time without a GPU) as the profiler's table."""
    from torch.autograd import DeviceType

    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)  # kernels
    cpu_us = sum(e.self_cpu_time_total for e in events)
    launches = sum(e.count for e in events if "LaunchKernel" in e.key or "LaunchCooperativeKernel" in e.key)
    key = "cuda_time_total" if cuda else "cpu_time_total"
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


def card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def write_text(path, text: str) -> None:
    """``path`` replaced whole (a temporary beside it, then renamed): never half-written."""
    tmp = f"{path}.partial"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path, data: dict) -> None:
    """``data`` as indented JSON, through ``write_text``."""
    write_text(path, json.dumps(data, indent=2))


def rounds(items: list, n: int) -> list[list]:
    """``n`` orders of ``items``, forward and reversed in turn: a variant measured first in one round is measured
    last in the next, so what the position in a run adds (the first variant after the frozen bases ran 3-5 ms
    slower on the TE layer) falls on every variant alike."""
    return [list(items) if i % 2 == 0 else list(reversed(items)) for i in range(n)]


def merge_rounds(rows: list[dict]) -> dict:
    """One variant's rows from several rounds -> one row: the median of the rounds' medians (``median_ms``), each
    round's in ``round_ms``, the memory of the first round."""
    merged = dict(rows[0])
    merged["round_ms"] = [r["median_ms"] for r in rows]
    merged["median_ms"] = statistics.median(merged["round_ms"])
    merged["min_ms"], merged["max_ms"] = min(r["min_ms"] for r in rows), max(r["max_ms"] for r in rows)
    return merged


def overhead(args) -> None:
    """The table: every ``--variants`` x ``--ranks`` against the frozen bases, interleaved; then the profiles."""
    rows = [measure(args, b, 0) for b in BASES]
    bases = {b: [r["median_ms"]] for b, r in zip(BASES, rows)}  # again between ranks and at the end: the noise
    for rank in args.ranks:
        runs = {}
        for order in rounds(args.variants, args.rounds):
            for variant in order:
                runs.setdefault(variant, []).append(measure(args, variant, rank))
                print(f"{variant} r={rank}: {runs[variant][-1]['median_ms']:.2f} ms", file=sys.stderr, flush=True)
        rows.extend(merge_rounds(runs[v]) for v in args.variants)
        for b in BASES:
            bases[b].append(measure(args, b, 0)["median_ms"])
    base_ms = {b: statistics.median(v) for b, v in bases.items()}
    result = {"card": card(), "dims": args.dims, "seq": args.seq, "batch": args.batch, "dtype": args.dtype,
              "fp8": args.fp8 if args.fp8 != "none" else None, "experts": args.experts, "legacy": args.legacy, "ddp": args.ddp,
              "rows": rows, "base_runs_ms": bases, "base_ms": base_ms, "torch": torch.__version__}
    result["profiles"] = {spec: profile(args, spec.split(":")[0], int(spec.split(":")[1]), args.profile_top)
                          for spec in args.profile}
    if args.out:
        write_json(args.out, result)
    runs = "; ".join(f"{b} {', '.join(f'{t:.2f}' for t in v)}" for b, v in bases.items())
    print(f"card: {result['card']}; dims {args.dims}, experts {args.experts or 'default'}, seq {args.seq} x batch "
          f"{args.batch}, {args.dtype}, FP8 base {args.fp8}; baseline runs (ms): {runs}; ratios against their medians")
    print(table(rows, base_ms))
    for spec, prof in result["profiles"].items():
        print(f"\nprofile {spec}: CPU {prof['cpu_ms_per_step']:.1f} ms, GPU kernels "
              f"{prof['gpu_kernel_ms_per_step']:.1f} ms, {prof['launches_per_step']:.0f} launches per step\n"
              f"{prof['table']}")


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
    p.add_argument("--fp8", choices=("none",) + tuple(FP8), default="none",
                   help="the frozen base in FP8 through Megatron's config (fp8, fp8_recipe, fp8_param; --spec te, GPU)")
    p.add_argument("--variants", nargs="+", default=None,
                   help=f"default: {' '.join(TARGETS + PLACEMENTS)} (none with --summary); also nemo_lora, "
                        "nemo_lora_fused (NeMo's LoRA through TE's op fuser; --spec te)")
    p.add_argument("--summary", default=None, metavar="PATH",
                   help="also (without --variants: only) the bf16 / FP8 cost table of SUMMARY, written to PATH")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=1,
                   help="measure the variants (the --summary cells) this many times, in forward and reversed order "
                        "in turn; each figure the median over the rounds")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--profile", nargs="*", default=[], help="variant:rank pairs to profile after the table")
    p.add_argument("--profile-top", type=int, default=12, help="ops per profile table")
    p.add_argument("--legacy", action="store_true",
                   help="the adapters before the fused path: three autograd ops per linear, one chain per expert")
    p.add_argument("--ddp", action="store_true",
                   help="adapters under Megatron's DDP as llm.finetune wraps them (fp32 main_grad; CUDA)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    refusal = fp8_refusal(args.fp8, args.spec)
    if args.ddp and not torch.cuda.is_available():
        refusal = "--ddp: Megatron's DDP puts its gradient buffers on a CUDA device"
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    if args.legacy:
        from nemo_mla_lora.peft import mla_lora
        from nemo_mla_lora.peft.adapter import MLALoRAAdapter

        MLALoRAAdapter.fused = lambda self, base: False
        mla_lora.group_experts = lambda model, frozen_too=False: 0

    from nemo_mla_lora.runtime import parallel

    parallel.init_megatron(seed=args.seed)
    if args.variants is not None or args.summary is None:
        args.variants = list(TARGETS + PLACEMENTS) if args.variants is None else args.variants
        overhead(args)
    if args.summary:
        from lora_summary import summary  # bench/, this script's directory

        return summary(args, sys.modules[__name__])
    return 0


if __name__ == "__main__":
    sys.exit(main())
