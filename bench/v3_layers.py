"""DeepSeek-V3 at its real width on one GPU, layer by layer: LoRA step time and memory, then the paper projection.

    python bench/v3_layers.py measure --out v3_layers.json          # GPU: V3's published config, bf16, seq 2048
    python bench/v3_layers.py measure --dims tiny --out tiny.json   # CPU smoke run (the tiny model's config)
    python bench/v3_layers.py project --table v3_layers.json --out v3_projection.json   # again, from any table

``measure``: Megatron decoder layers of ``models/configs/deepseek_v3.json`` (read by ``arch.hf_config.spec_from_hf``,
built by ``models.from_spec.config_from_spec``: Megatron's TE spec where Transformer Engine imports, else the local
spec), random bf16 weights, one layer kind at a time: a dense layer, an MoE layer of 256 experts, the output layer
(vocabulary shard, cross entropy), then layers cut to one rank's share of a layout (``--shards``: ``tp8`` = 16 heads,
FFN / 8, experts' FFN / 8, the q/kv down projections on s / 8 tokens as sequence parallelism runs them; ``ep8`` = 32
experts), then as many layers as the GPU holds in one stack (dense + MoE), to check that layers add up. Per kind and
variant (``frozen``; ``nemo_official``: MLALoRA r32 alpha 32, NeMo's V3 recipe; ``all_linear_r64``), sequence
``--seq`` x micro-batch 1: forward and forward + backward ms (CUDA events, median of ``--iters`` after ``--warmup``,
the variants in turn ``--rounds`` times with the medians over all rounds;
the frozen base runs backward to its input, as inside LoRA training), the bytes kept for backward (allocated after
the forward minus before, on the GPU; the saved tensors' storage on the CPU), the peak, weight bytes and trainable
parameters beside their counts from the config (``v3_shapes``). A kind whose weights do not fit the free memory is
skipped with the reason. The JSON is rewritten (whole, by a rename) after every row, with the projection of what is
measured so far (``v3_projection``, V3 dims only) and its Markdown beside it.
"""

import argparse
import dataclasses
import functools
import json
import statistics
import sys
from pathlib import Path

import torch
from lora_overhead import device, write_json, write_text
from v3_projection import project
from v3_report import markdown, measured_markdown, summary
from v3_shapes import VARIANTS, ep_layouts, layer_params, layer_trainable, official_layout, padded_vocab, shard_name
from v3_steps import fits, free_memory, inputs, timed_row

CONFIGS = {"v3": "deepseek_v3", "tiny": "tiny_mla"}
SHARDS = {"v3": ["tp8", "ep8", "ep32"], "tiny": ["tp2", "ep2"]}
HEAD_TP = {"v3": [1, 8], "tiny": [1, 2]}


def load_spec(dims: str):
    from nemo_mla_lora.arch.hf_config import spec_from_hf
    from nemo_mla_lora.models.architecture import CONFIG_DIR, builtin_config

    return spec_from_hf(builtin_config(CONFIGS[dims]), str(CONFIG_DIR / f"{CONFIGS[dims]}.json"))


def parse_shard(text: str) -> tuple[int, int]:
    """``tp8`` / ``ep8`` / ``tp1ep1`` -> (tp, ep); a shard with both TP and EP > 1 is refused (its attention and
    experts see different token counts, which one layer on one GPU cannot reproduce)."""
    tp = ep = 1
    rest = text
    for key in ("tp", "ep"):
        if rest.startswith(key):
            digits = "".join(ch for ch in rest[2:] if ch.isdigit())
            if not digits:
                break
            value, rest = int(digits), rest[2 + len(digits) :]
            tp, ep = (value, ep) if key == "tp" else (tp, value)
    if rest or (tp > 1 and ep > 1):
        raise ValueError(f"--shards {text!r}: expected tpN, epN or tp1ep1 (not TP and EP > 1 together)")
    return tp, ep


def shard_spec(spec, tp: int, ep: int):
    """The model cut to one rank's share: heads, FFNs by TP (experts' FFN by ETP = TP when EP = 1), experts by EP.
    Expert groups that no longer hold top-k candidates are dropped (plain top-k over the local experts)."""
    experts = spec.num_experts // ep
    groups, group_topk = spec.moe_num_groups, spec.moe_group_topk
    if experts and (experts % groups or experts // groups * group_topk < spec.moe_topk):
        groups, group_topk = 1, 1
    for name, n, d in (
        ("heads", spec.num_heads, tp),
        ("experts", spec.num_experts, ep),
        ("ffn", spec.ffn_hidden_size, tp),
        ("expert ffn", spec.moe_ffn_hidden_size, tp),
    ):
        if n % d:
            raise ValueError(f"shard {shard_name(tp, ep)}: {name} {n} do not divide by {d}")
    if experts and experts < spec.moe_topk:
        raise ValueError(f"shard {shard_name(tp, ep)}: {experts} local experts < top-k {spec.moe_topk}")
    return dataclasses.replace(
        spec,
        num_heads=spec.num_heads // tp,
        ffn_hidden_size=spec.ffn_hidden_size // tp,
        moe_ffn_hidden_size=spec.moe_ffn_hidden_size // tp,
        num_experts=experts,
        shared_expert_ffn_hidden_size=spec.shared_expert_ffn_hidden_size // tp,
        moe_num_groups=groups,
        moe_group_topk=group_topk,
    )


def build_stack(spec, pattern: list[int], seq: int, dtype, seed: int) -> torch.nn.Module:
    """Decoder layers (``pattern``: 0 dense, 1 MoE) as ``holder.layers``, seeded."""
    from megatron.core.transformer.spec_utils import build_module

    from nemo_mla_lora.models.from_spec import config_from_spec
    from nemo_mla_lora.runtime import cpu_compat

    layer_spec = dataclasses.replace(spec, num_layers=len(pattern), moe_layer_pattern=tuple(pattern))
    config = config_from_spec(layer_spec, dtype, seq_length=seq)
    cpu_compat.seed(seed)
    block = config.transformer_layer_spec(config)
    holder = torch.nn.Module()
    holder.layers = torch.nn.ModuleList(
        build_module(block.layer_specs[i], config=config, layer_number=i + 1) for i in range(len(pattern))
    )
    return holder.to(device())


def apply_variant(holder: torch.nn.Module, variant: str) -> torch.nn.Module:
    from nemo_mla_lora.peft import MLALoRA
    from nemo_mla_lora.peft.state import randomize_b

    placement, rank = VARIANTS[variant]
    if placement is None:
        return holder.requires_grad_(False)
    model = MLALoRA(placement=placement, dim=rank, alpha=rank)(holder)
    randomize_b(model, std=1e-3)  # B != 0: no GEMM runs on zeros
    return model


def sequence_parallel_down_projections(holder: torch.nn.Module, tp: int) -> None:
    """The q/kv down projections (duplicated under TP) on s / tp tokens, their outputs tiled back to s: the compute
    of one sequence-parallel rank, whose gathered latents feed the up projections."""

    def cut(module, args):
        return (args[0][: args[0].shape[0] // tp],) + tuple(args[1:])

    def tile(module, args, out):
        first = out[0] if isinstance(out, tuple) else out
        first = first.repeat(tp, *([1] * (first.dim() - 1)))
        return (first,) + tuple(out[1:]) if isinstance(out, tuple) else first

    for layer in holder.layers:
        for name in ("linear_q_down_proj", "linear_kv_down_proj"):
            module = getattr(layer.self_attention, name, None)
            if module is not None:
                module.register_forward_pre_hook(cut)
                module.register_forward_hook(tile)


def forward(holder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    for layer in holder.layers:
        x, _ = layer(x, attention_mask=None)  # causal by the layer's mask type
    return x


def measure_layers(args, spec, kind: str, shard: tuple, pattern: list, variant: str, dtype) -> dict:
    """One row: the layers ``pattern`` of the ``shard`` share of ``spec`` under ``variant``."""
    tp, ep = shard
    sim = shard_spec(spec, tp, ep)
    moe_flags = [bool(m) for m in pattern]
    row = {
        "kind": kind,
        "shard": shard_name(tp, ep),
        "tp": tp,
        "ep": ep,
        "variant": variant,
        "layers": len(pattern),
        "moe_layers": sum(moe_flags),
        "experts": sim.num_experts,
        "heads": sim.num_heads,
        "router_groups": sim.moe_num_groups,
        "seq": args.seq,
        "analytic_params": sum(layer_params(sim, m)["total"] for m in moe_flags),
        "analytic_trainable": sum(layer_trainable(sim, m, variant) for m in moe_flags),
    }
    why = fits(row["analytic_params"] * torch.finfo(dtype).bits // 8)
    if why:
        return row | {"skipped": why}
    try:
        model = apply_variant(build_stack(sim, pattern, args.seq, dtype, args.seed), variant)
        if tp > 1:
            sequence_parallel_down_projections(model, tp)
        x, grad = inputs(spec.hidden_size, args.seq, dtype, args.seed)
        row |= timed_row(lambda t: forward(model, t), x, grad, model, args)
        proj = model.layers[0].self_attention.linear_proj
        row["layer_spec"] = type(getattr(proj, "to_wrap", proj)).__name__
    except torch.cuda.OutOfMemoryError as err:
        row["error"] = f"out of memory: {str(err).splitlines()[0]}"
    return row


def measure_rounds(args, spec, kind: str, shard: tuple, pattern: list, dtype) -> list[dict]:
    """One row per variant, the variants measured in turn ``--rounds`` times (host speed drifts within a process):
    ``fwd_ms`` / ``step_ms`` are medians over every round's timed steps, memory is the last round's."""
    rounds: dict[str, list[dict]] = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for variant in args.variants:
            rounds[variant].append(measure_layers(args, spec, kind, shard, pattern, variant, dtype))
            free_memory()
    rows = []
    for variant, runs in rounds.items():
        row = runs[-1]
        timed = [r for r in runs if r.get("step_ms") is not None]
        if len(timed) > 1:
            row["step_ms_runs"] = [ms for r in timed for ms in r["step_ms_runs"]]
            row["fwd_ms_runs"] = [ms for r in timed for ms in r["fwd_ms_runs"]]
            row["step_ms"] = statistics.median(row["step_ms_runs"])
            row["fwd_ms"] = statistics.median(row["fwd_ms_runs"])
            row["step_ms_by_round"] = [r["step_ms"] for r in timed]
        row["rounds"] = len(timed)
        rows.append(row)
    return rows


def measure_head(args, spec, tp: int, dtype) -> dict:
    """The output layer's vocabulary shard at TP ``tp`` (frozen) + cross entropy in fp32, backward to its input."""
    vocab = padded_vocab(spec.vocab_size, tp) // tp
    gen = torch.Generator(device=device()).manual_seed(args.seed)
    head = torch.nn.Linear(spec.hidden_size, vocab, bias=False, device=device(), dtype=dtype).requires_grad_(False)
    torch.nn.init.normal_(head.weight, std=0.02, generator=gen)
    labels = torch.randint(0, vocab, (args.seq,), device=device(), generator=gen)
    x, grad = inputs(spec.hidden_size, args.seq, dtype, args.seed)

    def fwd(t):
        return torch.nn.functional.cross_entropy(head(t[:, 0]).float(), labels)

    row = {
        "kind": "head",
        "shard": shard_name(tp, 1),
        "tp": tp,
        "ep": 1,
        "variant": "frozen",
        "layers": 0,
        "vocab_rows": vocab,
        "seq": args.seq,
    } | timed_row(fwd, x, grad, head, args)
    return row


def stack_depth(args, rows: list) -> int:
    """MoE layers to stack after the dense one: ``--stack`` N, or (auto) as many as the free memory holds by the
    single-layer rows of nemo_official (weights + kept activations each, one layer's backward peak once)."""
    if args.stack != "auto":
        return int(args.stack)
    found = {
        r["kind"]: r
        for r in rows
        if r["shard"] == "tp1ep1" and r["variant"] == "nemo_official" and r.get("step_ms") is not None
    }
    if not torch.cuda.is_available() or not {"dense", "moe"} <= set(found):
        return 0
    dense, moe = found["dense"], found["moe"]
    budget = 0.92 * torch.cuda.mem_get_info()[0] - dense["weight_bytes"] - dense["act_bytes"]
    budget -= moe["step_peak_bytes"] - moe["act_bytes"]
    return max(0, int(budget // (moe["weight_bytes"] + 2 * moe["adapter_bytes"] + moe["act_bytes"])))


@functools.cache
def layouts() -> tuple:
    official = official_layout()
    return (official, *ep_layouts(official))


def save(args, result: dict, spec) -> None:
    """The JSON and its Markdown (+ the projection of the rows so far, for DeepSeek-V3's dims)."""
    text = measured_markdown(result)
    if args.dims == "v3":
        result["projection"] = project(result["rows"], spec, list(layouts()), args.variants)
        text = markdown(result["projection"], result["card"]) + "\n" + text
    write_text(Path(args.out).with_suffix(".md"), text)
    result["summary"] = summary(result)  # the part a results summary reads (as ``v3_layers``)
    write_json(Path(args.out), result)


def plan(args) -> list[tuple]:
    """(kind, shard, pattern) in the order measured: the full layers first, then the shards."""
    steps = [("dense", (1, 1), [0]), ("moe", (1, 1), [1])]
    for shard in map(parse_shard, args.shards):
        if shard[0] > 1:
            steps.append(("dense", shard, [0]))
        steps.append(("moe", shard, [1]))
    return steps


def measure(args) -> dict:
    """Every row of ``plan``, the heads, the stack; the JSON rewritten after each row."""
    from nemo_mla_lora.runtime import parallel

    if args.dims == "v3" and not torch.cuda.is_available():
        raise SystemExit("measure --dims v3 builds layers of 11.5 B parameters: it needs a GPU (--dims tiny on CPU)")
    bad = [tp for _, (tp, _), _ in plan(args) if args.seq % tp]
    if bad:
        raise SystemExit(f"--seq {args.seq} does not divide by TP {bad[0]} (the down projections' sequence shard)")
    parallel.init_megatron(seed=args.seed)
    spec = load_spec(args.dims)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device().type == "cuda" else "fp32")
    ]
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {
        "schema": "v3_layers/1",
        "card": card,
        "dims": args.dims,
        "config": CONFIGS[args.dims],
        "dtype": str(dtype).removeprefix("torch."),
        "seq": args.seq,
        "micro_batch": 1,
        "warmup": args.warmup,
        "iters": args.iters,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "variants": {v: VARIANTS[v] for v in args.variants},
        "shards": args.shards,
        "rows": [],
        "complete": False,
    }

    def add(row: dict) -> None:
        free_memory()  # the row's layers are garbage once it returns
        result["rows"].append(row)
        report(row)
        save(args, result, spec)

    for kind, shard, pattern in plan(args):
        for row in measure_rounds(args, spec, kind, shard, pattern, dtype):
            add(row)
        if (kind, shard) == ("moe", (1, 1)):
            for tp in args.head_tp or HEAD_TP[args.dims]:
                add(measure_head(args, spec, tp, dtype))
    depth = stack_depth(args, result["rows"])
    for variant in [v for v in ("frozen", "nemo_official") if v in args.variants] if depth else []:
        row = measure_layers(args, spec, "stack", (1, 1), [0] + [1] * depth, variant, dtype)
        layers = {
            r["kind"]: r.get("step_ms")
            for r in result["rows"]
            if r["shard"] == "tp1ep1" and r["variant"] == variant and r["kind"] in ("dense", "moe")
        }
        if None not in layers.values() and len(layers) == 2:
            row["sum_of_layers_ms"] = layers["dense"] + depth * layers["moe"]
        add(row)
    result["complete"] = True
    save(args, result, spec)
    return result


def report(row: dict) -> None:
    what = f"{row['kind']} {row['shard']} {row['variant']}"
    if row.get("step_ms") is None:
        print(f"{what}: {row.get('skipped') or row.get('error')}", file=sys.stderr, flush=True)
        return
    mem = row["act_bytes"] / 2**20
    print(
        f"{what}: fwd {row['fwd_ms']:.2f} ms, fwd+bwd {row['step_ms']:.2f} ms, kept {mem:,.1f} MiB, "
        f"trainable {row['trainable']:,}",
        file=sys.stderr,
        flush=True,
    )


def project_cmd(args) -> dict:
    """The projection of ``--table`` (a measured v3_layers.json or a hand-written {"rows": [...]})."""
    table = json.loads(Path(args.table).read_text())
    if table.get("dims", "v3") != "v3":
        raise SystemExit(f"{args.table}: measured on dims {table['dims']!r}; the projection is for DeepSeek-V3")
    overrides = {}
    for item in args.assume:
        name, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--assume {item!r}: expected name=JSON value (e.g. reserve_gib=6)")
        overrides[name] = json.loads(value)
    proj = project(table["rows"], load_spec("v3"), list(layouts()), args.variants, overrides)
    write_json(Path(args.out), proj)
    text = markdown(proj, table.get("card", args.table))
    write_text(Path(args.out).with_suffix(".md"), text)
    print(text)
    return proj


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--out", required=True)
    m.add_argument("--dims", choices=tuple(CONFIGS), default="v3")
    m.add_argument("--seq", type=int, default=2048)
    m.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on a GPU, fp32 on CPU")
    m.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    m.add_argument("--shards", nargs="*", default=None, help="one rank's share of a layout: tpN or epN")
    m.add_argument("--head-tp", type=int, nargs="*", default=None, help="the output layer's TP shards")
    m.add_argument("--stack", default="auto", help="MoE layers stacked after the dense one: N or auto (GPU memory)")
    m.add_argument("--warmup", type=int, default=3)
    m.add_argument("--iters", type=int, default=10)
    m.add_argument("--rounds", type=int, default=1, help="the variants in turn this many times (medians over all)")
    m.add_argument("--seed", type=int, default=1234)
    j = sub.add_parser("project")
    j.add_argument("--table", required=True)
    j.add_argument("--out", required=True)
    j.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    j.add_argument("--assume", nargs="*", default=[], help="assumption overrides: name=JSON value")
    args = p.parse_args(argv)
    if not Path(args.out).resolve().parent.is_dir():
        raise SystemExit(f"--out {args.out}: its folder does not exist")
    if args.cmd == "measure":
        args.shards = SHARDS[args.dims] if args.shards is None else args.shards
        measure(args)
    else:
        project_cmd(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
