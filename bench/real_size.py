"""DeepSeek-V2-Lite at its real size on one GPU: an HF checkpoint of the published config, the LoRA step table.

    python bench/real_size.py write --out /dev/shm/v2lite --tokenizer TOKDIR      # HF dir, random weights, bf16
    python bench/real_size.py table --base /dev/shm/v2lite --out table.json       # the step table (TE spec)
    python bench/real_size.py summary --results DIR --out summary.json           # gather the parts (PARTS)

``write``: every tensor of DeepSeek's released file layout for ``models/configs/deepseek_v2_lite.json`` (names and
shapes from ``export_scale.hf_tensors``, the package's key map), drawn on the GPU (N(0, 0.02) for matrices, 1 for
norms), saved in bf16 as ~4 GiB safetensors shards with an index, beside the config and a real tokenizer's
files (DeepSeek-V2's, ``TOKDIR``).

``table``: the model exactly as ``trainer=megatron`` builds it (``nemo_model_config`` of the composed config, NeMo's
``configure_model``; Megatron's TE spec where Transformer Engine imports), its weights streamed from the HF directory
by the trainer's own loader, then per variant the same micro-batch (sequence ``--seq``, random token ids) through
forward + loss + backward + AdamW on the trainable parameters: (a) ``frozen``: no adapters, backward to the
embedding output (what the base costs inside LoRA training); (b) ``nemo_official``: MLALoRA with NeMo's DeepSeek-V3
recipe values (dim 32, alpha 32); (c) ``all_linear_r64``; (d) ``nemo_lora``: NeMo's own ``llm.peft.LoRA`` on the
modules (b) wraps, same dim and alpha. Adapters are unwrapped between variants (the base stays on the GPU).
Time: wall clock around each step with the GPU synchronized, median over ``--iters`` after ``--warmup``; memory:
peak allocated during the variant's steps.

FLOPs per token (stated, Megatron's convention, as Megatron-Bridge reports its TFLOP/s): 6 x the active parameters
a token passes through (attention linears, the dense layer's MLP, the router, the shared experts and ``top-k``
routed experts per MoE layer, the output layer; not the embedding lookup) + the causal attention products
6 x layers x heads x (qk_nope + qk_rope + v) x seq / 2 x 2. A LoRA step on a frozen base does about 2/3 of it (no
weight gradients of the base), so this is the figure to compare with others' numbers, not a hardware count.
"""

import argparse
import gc
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from lora_overhead import card, device, nemo_lora, summarize  # bench/ is this script's directory
from real_size_check import bound_rel

CONFIG = Path(__file__).resolve().parents[1] / "nemo_mla_lora" / "models" / "configs" / "deepseek_v2_lite.json"
SHARD_BYTES = 4 << 30


def write(args) -> dict:
    """The HF directory: config.json, safetensors shards + index, the tokenizer's files; with ``--adapter``, an
    HF PEFT LoRA of rank ``--adapter-rank`` on every linear (the export's input when no training ran)."""
    from safetensors.torch import save_file

    out = Path(args.out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or name another directory")
    from export_scale import hf_tensors  # bench/ is this script's directory

    raw = json.loads(Path(args.config).read_text())
    shapes = hf_tensors(raw)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(args.seed)
    weight_map, shard, shard_bytes, index, total, start = {}, {}, 0, 0, 0, time.perf_counter()

    def flush():
        nonlocal shard, shard_bytes, index
        if shard:
            name = f"model-{index:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            index, shard, shard_bytes = index + 1, {}, 0
            print(f"shard {index}: {total / 1e9:.1f} GB, {time.perf_counter() - start:.0f} s", flush=True)

    for name, shape in shapes.items():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, device=device, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()
        shard[name], shard_bytes, total = t, shard_bytes + t.nbytes, total + t.nbytes
        if shard_bytes >= args.shard_bytes:
            flush()
    flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    raw["torch_dtype"] = "bfloat16"
    (tmp / "config.json").write_text(json.dumps(raw, indent=2))
    for f in Path(args.tokenizer).iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    info = {"tensors": len(shapes), "bytes": total, "params": total // 2, "shards": index,
            "seconds": round(time.perf_counter() - start, 1)}
    if args.adapter:
        from export_scale import _make_adapter

        _make_adapter(Path(args.adapter), shapes, args.adapter_rank)
        info["adapter_seconds"] = round(time.perf_counter() - start - info["seconds"], 1)
    print(json.dumps(info))
    return info


def flops_per_token(spec, seq: int) -> float:
    """Megatron-convention model FLOPs per token (see the module docstring)."""
    h, heads = spec.hidden_size, spec.num_heads
    dn, dr, dv = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim
    c, rq = spec.kv_lora_rank, spec.q_lora_rank
    q = heads * (dn + dr) * (h if rq is None else rq) + (0 if rq is None else rq * h)
    attention = q + (c + dr) * h + heads * (dn + dv) * c + h * heads * dv
    active = 0
    for layer in range(spec.num_layers):
        active += attention
        if spec.is_moe_layer(layer):
            routed = spec.moe_topk * 3 * h * spec.moe_ffn_hidden_size
            shared = 3 * h * (spec.shared_expert_ffn_hidden_size or 0)
            active += routed + shared + spec.num_experts * h
        else:
            active += 3 * h * spec.ffn_hidden_size
    active += spec.vocab_size * h
    attention_products = spec.num_layers * heads * (dn + dr + dv) * seq  # QK^T and PV, causal (x 1/2), x 2 FLOPs
    return 6.0 * active + 6.0 * attention_products


def unwrap(model: torch.nn.Module, saved_flags: dict) -> int:
    """Replace every adapter wrapper (NeMo's and ours: a module with ``to_wrap``) by the module it wraps and
    restore the TE flags the wrappers changed; returns how many were unwrapped."""
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if hasattr(child, "to_wrap") and isinstance(child.to_wrap, torch.nn.Module):
                setattr(module, child_name, child.to_wrap)
                count += 1
    for module, flags in saved_flags.items():
        for k, v in flags.items():
            setattr(module, k, v)
    for p in model.parameters():
        p.requires_grad_(False)
    return count


def te_flags(model: torch.nn.Module) -> dict:
    keys = ("return_layernorm_output", "return_layernorm_output_gathered")
    return {m: {k: getattr(m, k) for k in keys if hasattr(m, k)} for m in model.modules()
            if any(hasattr(m, k) for k in keys)}


def apply_variant(model, variant: str):
    from nemo_mla_lora.peft import MLALoRA
    from nemo_mla_lora.peft.state import randomize_b

    if variant == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    if variant == "nemo_lora":  # on the modules (b) wraps, dim = alpha = 32, its B != 0
        return nemo_lora(model, 32)
    if variant == "nemo_official":
        wrapped = MLALoRA(placement="nemo_official", dim=32, alpha=32)(model)
    elif variant == "all_linear_r64":
        wrapped = MLALoRA(placement="all_linear", dim=64, alpha=64)(model)
    else:
        raise ValueError(f"variant={variant!r}")
    randomize_b(wrapped, std=1e-3)  # B != 0: no GEMM runs on zeros
    return wrapped


def run_steps(model, tokens, warmup: int, iters: int, trace: int = 0) -> tuple[list[float], float, dict | None, dict]:
    """Per-step ms (wall clock, the GPU synchronized after each step), the peak GiB allocated during the steps (0 on
    CPU), with ``trace`` > 0 a profile of that many more steps on the same optimizer (``lora_overhead.summarize``),
    and the caching allocator's view of the timed steps: peak GiB reserved and how often it freed its cache to retry
    an allocation (each retry synchronizes the device; empty on CPU)."""
    cuda = tokens.is_cuda
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda) if params else None
    embedding = model.embedding
    hook = embedding.register_forward_hook(lambda m, i, o: o.requires_grad_()) if not params else None
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).expand(b, s)
    mask = None if cuda else torch.ones(1, 1, s, s, dtype=torch.bool).triu(1)  # TE: causal by its mask type
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) if cuda else 0

    def step():
        loss = model(tokens, position_ids, attention_mask=mask, labels=tokens).float().mean()
        loss.backward()
        if optimizer:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        step()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    allocator = {}
    if cuda:
        stats = torch.cuda.memory_stats()
        allocator = {"peak_reserved_gib": stats["reserved_bytes.all.peak"] / 2**30,
                     "alloc_retries": stats["num_alloc_retries"] - retries}
    traced = None
    if trace:
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(trace):
                step()
        traced = summarize(prof, trace, cuda, top=30)
    if hook:
        hook.remove()
    del optimizer
    return times, peak, traced, allocator


def build_trainer_model(base: str, seq: int):
    """The Megatron model as ``trainer=megatron`` builds it, weights streamed from the HF directory ``base``
    (bf16 on a GPU; float32 on CPU, where the smoke test runs it)."""
    from nemo_mla_lora.runtime import parallel
    from nemo_mla_lora.config.compose import compose
    from nemo_mla_lora.models.architecture import resolve
    from nemo_mla_lora.models.from_config import nemo_model_config
    from nemo_mla_lora.training.hf_load import load_hf_checkpoint

    parallel.init_megatron()
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    cfg = compose("finetune", [f"model.checkpoint={base}", "trainer=megatron", f"model.seq_length={seq}",
                               f"data.seq_length={seq}", f"model.dtype={dtype}"])
    spec = resolve(cfg.model)
    config = nemo_model_config(cfg.model, cfg.trainer, spec)
    model = config.configure_model(tokenizer=None).to(device())
    start = time.perf_counter()
    load_hf_checkpoint([model], base)
    load_s = time.perf_counter() - start
    for p in model.parameters():
        p.requires_grad_(False)
    return model, spec, config, load_s


def table(args) -> dict:
    from nemo_mla_lora.peft import MLALoRA

    model, spec, config, load_s = build_trainer_model(args.base, args.seq)
    gen = torch.Generator(device=device()).manual_seed(0)
    tokens = torch.randint(0, spec.vocab_size, (args.batch, args.seq), device=device(), generator=gen)
    targets = list(MLALoRA(placement="nemo_official").resolve(model))  # the leaves (b) and (d) wrap, recorded
    fpt = flops_per_token(spec, args.seq)
    flags = te_flags(model)
    result = {"card": card(), "seq": args.seq, "batch": args.batch, "load_seconds": load_s,
              "flops_per_token": fpt, "layer_spec": type(model.decoder.layers[0].self_attention.linear_proj).__name__,
              "weights_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
              "step_ms": {}, "step_ms_runs": {}, "tokens_per_s": {}, "tflops": {}, "peak_gib": {}, "trainable": {},
              "nemo_lora_targets": targets, "rounds": args.rounds}
    profiled = set()
    for variant in [v for _ in range(args.rounds) for v in args.variants]:  # round after round: host speed drifts
        wrapped = apply_variant(model, variant)
        result["trainable"][variant] = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        trace = args.trace if variant in set(args.profile) - profiled else 0  # each profiled once
        if trace:
            profiled.add(variant)
        oom = None
        try:
            times, peak, traced, allocator = run_steps(wrapped, tokens, args.warmup, args.iters, trace)
        except torch.cuda.OutOfMemoryError as err:  # recorded; the other variants still run
            oom = str(err).splitlines()[0]
        unwrap(wrapped, flags)  # the base alone again, after the steps or their out-of-memory error
        gc.collect()  # out of the except block: an error's traceback (and the step's tensors) is garbage now
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if oom:
            result.setdefault("out_of_memory", {})[variant] = oom
            print(f"{variant}: out of memory at batch {args.batch}: {oom}", flush=True)
            continue
        if allocator:
            result.setdefault("allocator", {}).setdefault(variant, []).append(allocator)
        if traced:
            result.setdefault("profile", {})[variant] = traced
            print(f"{variant} profile: host {traced['cpu_ms_per_step']:.0f} ms, kernels "
                  f"{traced['gpu_kernel_ms_per_step']:.0f} ms, {traced['launches_per_step']:.0f} launches per step\n"
                  f"{traced['table']}", flush=True)
        runs = result["step_ms_runs"].setdefault(variant, [])
        runs.append(statistics.median(times))  # a variant listed twice (the frozen base): the median of its runs
        ms = statistics.median(runs)
        tps = args.batch * args.seq / (ms / 1e3)
        result["step_ms"][variant] = ms
        result["tokens_per_s"][variant], result["tflops"][variant] = tps, tps * fpt / 1e12
        result["peak_gib"][variant] = max(peak, result["peak_gib"].get(variant, 0.0))
        print(f"{variant}: {ms:.1f} ms/step, {tps:,.0f} tokens/s, {tps * fpt / 1e12:.1f} TFLOP/s, "
              f"peak {peak:.1f} GiB, trainable {result['trainable'][variant]:,}, {allocator}", flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2))  # what finished survives a cut
    return result


PARTS = {  # summary field <- the file a run_gpu.sh step writes under $OUT
    "table": "real_size_table.json",
    "export": "real_size_export.json",
    "cp": "real_size_cp.json",
    "mcore_0_15": "real_size_load_mcore_0_15.json",
    "mcore_0_19": "real_size_load_mcore_0_19.json",
    "floor": "real_size_floor_mcore_0_15.json",  # the base alone in 0.15.3's model: both loads' bound
    "engine": "real_size_engine.json",
    "v3_layers": "v3_layers.json",
    "finetune": "real_size_finetune_summary.json",  # recipes.finetune's summary.json (run_gpu.sh collect)
    "finetune_run": "real_size_finetune.json",
}


def finetune_summary(run: dict | None, measured: dict | None) -> dict | None:
    """The ``trainer=megatron`` run from the HF directory: losses, its export's verify, wall seconds, peak RSS."""
    if run is None:
        return None
    verify = run.get("verify") or {}
    return {"trainer": run.get("trainer"), "placement": run.get("placement"), "steps": run.get("steps"),
            "train_loss_first_last": run.get("train_loss_first_last"), "export_format": run.get("export_format"),
            "verify_passed": verify.get("passed"), "verify_max_abs_logit_diff": verify.get("max_abs_logit_diff"),
            "verify_bound": verify.get("bound"),
            **({} if measured is None else {"seconds": measured["seconds"], "peak_rss_gib": measured["peak_rss_gib"],
                                            "rc": measured["rc"]})}


def megatron_load(report: dict | None, floor: dict | None) -> dict | None:
    """One release's load: loaded, max_rel against the unmerged model, and (where the floor ran) the floor, the bound
    ``real_size_check.bound_rel`` draws from it and whether max_rel is within; the floor is measured in 0.15.3's
    model and bounds both releases (a load run in another call never saw it, so the bound is drawn here)."""
    if report is None:
        return None
    out = {"loaded": report.get("loaded", False), "max_rel": report.get("max_rel")}
    if floor is not None and out["max_rel"] is not None:
        bound = bound_rel(floor["max_rel"])
        out.update(floor_rel=floor["max_rel"], bound_rel=bound, within=out["max_rel"] <= bound,
                   argmax_agreement=report.get("argmax_agreement"))
    return out


def summary(args) -> dict:
    """summary.json from the parts under ``--results``; a part not there is null and listed in ``missing``."""
    results = Path(args.results)
    parts = {k: json.loads((results / f).read_text()) if (results / f).is_file() else None for k, f in PARTS.items()}
    table, export, cp, engine = parts["table"] or {}, parts["export"], parts["cp"], parts["engine"]
    gpu = results / "gpu.txt"
    out = {
        "card": table.get("card") or (gpu.read_text().split(",")[0].strip() if gpu.is_file() else None),
        "flops_per_token": table.get("flops_per_token"),
        **{k: table.get(k) for k in ("tokens_per_s", "step_ms", "peak_gib", "tflops")},
        "export": None
        if export is None or cp is None
        else {"seconds": export["seconds"], "cp_seconds": cp["seconds"], "peak_rss_gib": export["peak_rss_gib"],
              "share_of_cp_rate": cp["seconds"] / export["seconds"], "rc": export["rc"]},
        "megatron_load": {k: megatron_load(parts[k], parts["floor"]) for k in ("mcore_0_15", "mcore_0_19")},
        "engine": None
        if engine is None or "engine" not in engine
        else {"tokens_per_s": engine["engine"]["no_adapter"]["tokens_per_s"],
              "tokens_per_s_8_adapters": engine["engine"]["multi_adapter"]["tokens_per_s"]},
        "v3_layers": parts["v3_layers"],
        "finetune": finetune_summary(parts["finetune"], parts["finetune_run"]),
        "missing": sorted(f for k, f in PARTS.items() if parts[k] is None),
    }
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=1))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--out", required=True)
    w.add_argument("--tokenizer", required=True)
    w.add_argument("--config", default=str(CONFIG))
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--shard-bytes", type=int, default=SHARD_BYTES)
    w.add_argument("--adapter", help="also write an HF PEFT LoRA on every linear into this directory")
    w.add_argument("--adapter-rank", type=int, default=16)
    t = sub.add_parser("table")
    t.add_argument("--base", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--seq", type=int, default=4096)
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--iters", type=int, default=8)
    t.add_argument("--variants", nargs="+", default=["frozen", "nemo_official", "all_linear_r64", "nemo_lora",
                                                     "frozen"])
    t.add_argument("--profile", nargs="*", default=[], metavar="VARIANT",
                   help="after its timed steps, profile --trace more steps of each of these variants")
    t.add_argument("--trace", type=int, default=1)
    t.add_argument("--rounds", type=int, default=1,
                   help="run the variants in turn this many times; each variant's step_ms is the median of its runs")
    m = sub.add_parser("summary")
    m.add_argument("--results", required=True, help="a run's files from $OUT (run_gpu.sh real_size_* steps)")
    m.add_argument("--out", required=True)
    args = p.parse_args(argv)
    {"write": write, "table": table, "summary": summary}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
