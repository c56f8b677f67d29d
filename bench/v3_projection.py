"""DeepSeek-V3 LoRA on many GPUs, on paper: per-GPU memory and step time from the per-layer table of v3_layers.py.

Nothing here is measured: the weights come from the published config (exact parameter counts, split as Megatron's
Transformer Engine spec splits them), and every activation size and compute time comes from the per-layer table
that ``bench/v3_layers.py measure`` writes on one GPU. A number that needs a measurement the table lacks is None
and named in ``missing``. Every other input is a named assumption (``ASSUMPTIONS``: value and why), written into
the JSON and the Markdown table.

Weights and layouts: ``v3_shapes.py``.

Pipeline (1F1B, no virtual stages; m micro-batches per step, p stages with per-micro-batch times T_s):
step = sum_s T_s + (m - 1) * max_s T_s; bubble = 1 - m * max_s T_s / step (equal stages: (p - 1) / (m + p - 1)).
Stage s holds the activations of min(p - s, m) micro-batches.
"""

from v3_shapes import Layout, layer_params, layer_trainable, padded_vocab, shard_name, stage_kinds

from nemo_mla_lora.arch.mla_spec import MLASpec

GIB = 2**30

ASSUMPTIONS = {
    "gpu_memory_gib": (79.6, "H100 SXM 80 GB as torch reports it (81,559 MiB)"),
    "reserve_gib": (4.0, "CUDA context, NCCL buffers, allocator fragmentation: not measured, a round figure"),
    "nvlink_busbw_gbps": (
        360.0,
        "NCCL all-gather / reduce-scatter bus bandwidth in one 8 x H100 node (NVLink 4: "
        "450 GB/s per direction per GPU, ~80% reached)",
    ),
    "nvlink_alltoall_gbps": (300.0, "NCCL all-to-all inside one node, per GPU"),
    "ib_per_gpu_gbps": (40.0, "one 400 Gb/s NDR NIC per GPU (50 GB/s), ~80% reached; all-to-all and p2p across nodes"),
    "gpus_per_node": (8, "5 x 8 H100 as NeMo's recipe; a group of <= 8 consecutive ranks stays inside a node"),
    "comm_overlap_fraction": (0.0, "no overlap of TP/EP/PP communication with compute: an upper bound on time"),
    "bytes_per_trainable_param": (
        18,
        "bf16 param 2 + fp32 main grad 4 (bf16_mixed: grad_reduce_in_fp32) + fp32 "
        "master 4 + Adam moments 8; no distributed optimizer (NeMo's LoRA recipe)",
    ),
    "fp8_bytes_per_weight": (
        1 + 4 / (128 * 128),
        "e4m3 + one fp32 scale per 128 x 128 block (DeepSeek's FP8 "
        "files) for the decoder linears; norms, router, embedding, "
        "output layer stay bf16",
    ),
    "fp8_transpose_copy": (
        True,
        "Hopper FP8 GEMMs take one layout: the backward (dgrad) needs the transposed "
        "weight, so TE keeps a second FP8 copy: weights_fp8_gib counts it, "
        "weights_fp8_rowwise_gib does not",
    ),
    "activation_tp_split": (
        "1/tp",
        "with sequence parallelism every tensor a layer saves is split by TP "
        "(Korthikanti et al. 2022): measured TP 1 bytes / tp",
    ),
    "ep_compute": (
        "measured EP shard, else the full layer",
        "balanced routing: an EP rank computes the same "
        "token-expert pairs as one GPU with all experts (s x top-k), on 256/ep experts",
    ),
    "tp_compute": (
        "measured TP shard, else full layer / tp",
        "the shard's time when measured; else ideal scaling, optimistic for narrow GEMMs",
    ),
    "moe_combine_bytes": (
        4,
        "Megatron's alltoall dispatcher reduce-scatters the expert outputs over the expert "
        "TP group in the router's dtype (NeMo's V3 config: moe_router_dtype fp32)",
    ),
    "hbm_gbps": (3350.0, "H100 SXM HBM3, for the optimizer step (memory bound)"),
    "recompute_full_cost": ("+1 forward", "full recompute keeps each layer's input and runs its forward again"),
    "dp_grad_allreduce": (
        "all trainable, fp32, once per step",
        "not overlapped; expert adapters (whose expert-DP "
        "group is smaller) counted over the whole DP group: an upper bound",
    ),
    "not_timed": (
        "embedding lookup, loss reduction over TP, adapters' rank-r collectives, optimizer launches",
        "small beside a layer (an adapter on a TP-split linear gathers or reduce-scatters s x r x 2 B, r <= 64): "
        "left out",
    ),
}

FORMULAS = (
    "step = sum_s T_s + (m - 1) x max_s T_s + DP all-reduce + Adam (1F1B, m micro-batches, T_s: stage s per "
    "micro-batch: its layers' measured fwd + bwd, TP / expert-TP / EP communication, pipeline sends)",
    "bubble = 1 - m x max_s T_s / (sum_s T_s + (m - 1) x max_s T_s); equal stages: (p - 1) / (m + p - 1)",
    "stage s keeps the activations of min(p - s, m) micro-batches; the last stage also the output layer's",
    "ring collective over n ranks: bytes x (n - 1) / n / bandwidth; all-to-all: bytes leaving the rank / bandwidth",
)


def assumption(name: str, overrides: dict | None = None):
    return (overrides or {}).get(name, ASSUMPTIONS[name][0])


class Table:
    """The per-layer table: rows keyed by (kind, shard, variant); kind dense | moe | head."""

    def __init__(self, rows: list[dict]):
        self.rows = {(r["kind"], r["shard"], r["variant"]): r for r in rows if r.get("step_ms") is not None}

    def get(self, kind: str, shard: str, variant: str) -> dict | None:
        return self.rows.get((kind, shard, "frozen" if kind == "head" else variant))


def layer_time(table: Table, kind: str, layout: Layout, variant: str) -> tuple:
    """(fwd + bwd ms, fwd ms, source) of one layer (or the head) per micro-batch on one rank of ``layout``."""
    ep = layout.ep if kind == "moe" else 1
    row = table.get(kind, shard_name(layout.tp, ep), variant)
    if row:
        return row["step_ms"], row.get("fwd_ms"), f"measured {kind} {shard_name(layout.tp, ep)}"
    full = table.get(kind, shard_name(1, 1), variant)
    if full is None:
        return None, None, f"missing {kind} {shard_name(1, 1)} {'frozen' if kind == 'head' else variant}"
    fwd = None if full.get("fwd_ms") is None else full["fwd_ms"] / layout.tp
    how = "full layer / tp" if layout.tp > 1 else "full layer (all experts: upper bound for EP)"
    return full["step_ms"] / layout.tp, fwd, f"{kind} tp1ep1: {how}"


def layer_activation(table: Table, kind: str, layout: Layout, variant: str) -> float | None:
    """Bytes one layer (or the head) keeps for backward per micro-batch on one rank: the head's measured vocabulary
    shard, else the measurement at TP 1 split by TP."""
    head = table.get(kind, shard_name(layout.tp, 1), variant) if kind == "head" else None
    if head is not None and head.get("act_bytes") is not None:
        return head["act_bytes"]
    full = table.get(kind, shard_name(1, 1), variant)
    if full is None or full.get("act_bytes") is None:
        return None
    return full["act_bytes"] / layout.tp


def _collective_ms(full_bytes: float, group: int, gbps: float, overlap: float) -> float:
    """Ring all-gather / reduce-scatter of a ``full_bytes`` tensor over ``group`` ranks."""
    return 0.0 if group <= 1 else full_bytes * (group - 1) / group / (gbps * 1e9) * 1e3 * (1 - overlap)


def comm_per_layer(spec: MLASpec, layout: Layout, moe: bool, a: dict | None = None) -> dict:
    """TP / expert-TP / EP bytes and ms of one layer per micro-batch (forward + backward) on one rank."""
    s, h, k = layout.seq * layout.micro_batch, spec.hidden_size, spec.moe_topk
    gpn, overlap = assumption("gpus_per_node", a), assumption("comm_overlap_fraction", a)
    bw_tp = assumption("nvlink_busbw_gbps", a) if layout.tp <= gpn else assumption("ib_per_gpu_gbps", a)
    tp_full = []  # full sizes of the TP group's collectives in the forward; the backward mirrors them
    if layout.tp > 1:
        q_in = spec.q_lora_rank or h  # q up (or q_proj) gathers its input over the sequence
        tp_full += [s * q_in * 2, s * spec.kv_lora_rank * 2, s * spec.qk_rope_head_dim * 2, s * h * 2]
        if not moe or spec.shared_expert_ffn_hidden_size:
            tp_full += [s * h * 2, s * h * 2]  # dense MLP or shared expert: gather in, reduce-scatter out
    etp_full = []
    if moe and layout.etp > 1:  # the dispatcher gathers the permuted tokens, reduce-scatters the outputs
        etp_full = [s * k * h * 2, s * k * h * assumption("moe_combine_bytes", a)]
    ep_send = 0.0
    if moe and layout.ep > 1:  # all-to-all: this rank's tokens x top-k, the share leaving it; dispatch + combine
        ep_send = 2 * (s / layout.tp) * k * h * 2 * (layout.ep - 1) / layout.ep
    bw_ep = assumption("nvlink_alltoall_gbps", a) if layout.tp * layout.ep <= gpn else assumption("ib_per_gpu_gbps", a)
    out = {
        "tp_bytes": 2 * sum(tp_full) * (layout.tp - 1) / layout.tp,
        "tp_ms": 2 * sum(_collective_ms(b, layout.tp, bw_tp, overlap) for b in tp_full),
        "etp_bytes": 2 * sum(etp_full) * (layout.etp - 1) / layout.etp,
        "etp_ms": 2 * sum(_collective_ms(b, layout.etp, bw_tp, overlap) for b in etp_full),
        "ep_bytes": 2 * ep_send,
        "ep_ms": 2 * ep_send / (bw_ep * 1e9) * 1e3 * (1 - overlap),
        "ep_link": "nvlink" if layout.tp * layout.ep <= gpn else "ib",
    }
    out["ms"] = out["tp_ms"] + out["etp_ms"] + out["ep_ms"]
    return out


def stage_weights(spec: MLASpec, layout: Layout, stage: int, kinds: dict, a: dict | None = None) -> dict:
    """Weight bytes on one rank of ``stage``: bf16, FP8 (with and without the transposed copy)."""
    d = layer_params(spec, False, layout.tp, layout.ep, layout.etp)
    m = layer_params(spec, True, layout.tp, layout.ep, layout.etp) if spec.num_experts else d
    total = kinds["dense"] * d["total"] + kinds["moe"] * m["total"]
    fp8_able = kinds["dense"] * d["fp8_eligible"] + kinds["moe"] * m["fp8_eligible"]
    vocab_rows = padded_vocab(spec.vocab_size, layout.tp) // layout.tp
    extra = vocab_rows * spec.hidden_size if stage == 0 else 0  # embedding
    extra += vocab_rows * spec.hidden_size + spec.hidden_size if stage == layout.pp - 1 else 0  # output + norm
    fp8 = fp8_able * assumption("fp8_bytes_per_weight", a)
    rowwise = fp8 + 2 * (total - fp8_able + extra)
    return {
        "params": total + extra,
        "bf16": 2 * (total + extra),
        "fp8_rowwise": rowwise,
        "fp8": rowwise + (fp8 if assumption("fp8_transpose_copy", a) else 0),
    }


def stage_memory(spec: MLASpec, layout: Layout, stage: int, variant: str, table: Table, a=None) -> dict:
    """GiB on one rank of ``stage`` and the measurements it lacked."""
    kinds, missing = stage_kinds(spec, layout)[stage], []
    w = stage_weights(spec, layout, stage, kinds, a)
    trainable = sum(
        n * layer_trainable(spec, kind == "moe", variant, layout.tp, layout.ep, layout.etp) for kind, n in kinds.items()
    )
    acts = {}
    for kind, n in kinds.items():
        acts[kind] = layer_activation(table, kind, layout, variant) if n else 0.0
        if acts[kind] is None:
            missing.append(f"act {kind} tp1ep1 {variant}")
    inflight = min(layout.pp - stage, layout.microbatches)
    act = None
    if not missing:
        if layout.recompute == "full":  # each layer's input kept; one layer's activations live while it recomputes
            per_input = layout.seq * layout.micro_batch * spec.hidden_size * 2 / layout.tp
            act = inflight * sum(kinds.values()) * per_input + max(acts.values())
        else:
            act = inflight * sum(n * acts[kind] for kind, n in kinds.items())
    head_act = 0.0
    if stage == layout.pp - 1:
        head_act = layer_activation(table, "head", layout, variant)
        if head_act is None:
            missing.append("act head tp1ep1")
    out = {
        "trainable_params": trainable,
        "inflight_microbatches": inflight,
        "weights_bf16_gib": w["bf16"] / GIB,
        "weights_fp8_gib": w["fp8"] / GIB,
        "weights_fp8_rowwise_gib": w["fp8_rowwise"] / GIB,
        "lora_states_gib": trainable * assumption("bytes_per_trainable_param", a) / GIB,
        "activations_gib": None if act is None else act / GIB,
        "head_activations_gib": None if head_act is None else head_act / GIB,
        "reserve_gib": assumption("reserve_gib", a),
        "missing": missing,
    }
    if not missing:
        rest = out["lora_states_gib"] + out["activations_gib"] + out["head_activations_gib"] + out["reserve_gib"]
        for w in ("bf16", "fp8_rowwise", "fp8"):
            out[f"total_{w}_gib"] = out[f"weights_{w}_gib"] + rest
    return out


def p2p_ms(spec: MLASpec, layout: Layout, stage: int, a: dict | None = None) -> float:
    """Pipeline sends of one micro-batch from ``stage``: activations forward, gradients backward ([s/tp, b, h])."""
    nbytes = layout.seq * layout.micro_batch * spec.hidden_size * 2 / layout.tp
    sends = (stage < layout.pp - 1) + (stage > 0)
    inter_node = layout.gpus // layout.pp >= assumption("gpus_per_node", a)
    gbps = assumption("ib_per_gpu_gbps", a) if inter_node else assumption("nvlink_busbw_gbps", a)
    return sends * nbytes / (gbps * 1e9) * 1e3 * (1 - assumption("comm_overlap_fraction", a))


def stage_time(spec: MLASpec, layout: Layout, stage: int, variant: str, table: Table, a=None) -> dict:
    """ms of one micro-batch's forward + backward on ``stage`` (compute, TP/EP communication, p2p)."""
    kinds, missing, sources, ms = stage_kinds(spec, layout)[stage], [], {}, 0.0
    for kind, n in kinds.items():
        if not n:
            continue
        step, fwd, sources[kind] = layer_time(table, kind, layout, variant)
        full = layout.recompute == "full"
        if step is None or (full and fwd is None):
            missing.append(sources[kind] if step is None else f"fwd_ms of {sources[kind]}")
            continue
        comm = comm_per_layer(spec, layout, kind == "moe", a)
        ms += n * (step + comm["ms"] + ((fwd + comm["ms"] / 2) if full else 0.0))  # recompute: forward again
    if stage == layout.pp - 1:
        step, _, sources["head"] = layer_time(table, "head", layout, variant)
        if step is None:
            missing.append(sources["head"])
        else:
            ms += step
    p2p = p2p_ms(spec, layout, stage, a)
    return {"ms": None if missing else ms + p2p, "p2p_ms": p2p, "sources": sources, "missing": missing}


def step_time(spec: MLASpec, layout: Layout, variant: str, table: Table, a=None) -> dict:
    """One optimizer step: the 1F1B pipeline over m micro-batches, the DP gradient all-reduce, the Adam step."""
    stages = [stage_time(spec, layout, s, variant, table, a) for s in range(layout.pp)]
    missing = sorted({m for st in stages for m in st["missing"]})
    out = {
        "stage_ms": [st["ms"] for st in stages],
        "sources": stages[-1]["sources"] | stages[0]["sources"],
        "p2p_ms": [st["p2p_ms"] for st in stages],
        "missing": missing,
    }
    if missing:
        return out | {"step_s": None}
    t, m = out["stage_ms"], layout.microbatches
    pipeline = sum(t) + (m - 1) * max(t)
    trainable = max(stage_memory(spec, layout, s, variant, table, a)["trainable_params"] for s in range(layout.pp))
    gpn = assumption("gpus_per_node", a)
    bw = assumption("nvlink_busbw_gbps", a) if layout.tp * layout.dp <= gpn else assumption("ib_per_gpu_gbps", a)
    dp_ms = 0.0 if layout.dp == 1 else trainable * 4 * 2 * (layout.dp - 1) / layout.dp / (bw * 1e9) * 1e3
    opt_ms = trainable * 2 * assumption("bytes_per_trainable_param", a) / (assumption("hbm_gbps", a) * 1e9) * 1e3
    step_ms = pipeline + dp_ms + opt_ms
    tokens = layout.global_batch * layout.seq
    return out | {
        "pipeline_ms": pipeline,
        "bubble_fraction": 1 - m * max(t) / pipeline,
        "dp_allreduce_ms": dp_ms,
        "optimizer_ms": opt_ms,
        "step_s": step_ms / 1e3,
        "tokens_per_s": tokens / (step_ms / 1e3),
        "tokens_per_s_per_gpu": tokens / (step_ms / 1e3) / layout.gpus,
    }


def project_layout(spec: MLASpec, layout: Layout, variant: str, table: Table, a=None) -> dict:
    """Memory of every stage, the step time, and whether the worst stage fits (bf16 / FP8 weights)."""
    stages = [stage_memory(spec, layout, s, variant, table, a) for s in range(layout.pp)]
    time = step_time(spec, layout, variant, table, a)
    missing = sorted({m for st in stages for m in st["missing"]} | set(time["missing"]))
    out = {"stages": stages, "time": time, "missing": missing}
    if not any(st["missing"] for st in stages):
        cap = assumption("gpu_memory_gib", a)
        for w in ("bf16", "fp8_rowwise", "fp8"):
            out[f"worst_{w}_gib"] = max(st[f"total_{w}_gib"] for st in stages)
            out[f"fits_{w}"] = out[f"worst_{w}_gib"] <= cap
    return out


def project(rows: list[dict], spec: MLASpec, layouts: list[Layout], variants: list[str], a=None) -> dict:
    """The paper projection of every layout and variant from the per-layer ``rows`` (see ``Table``).

    Args:
        rows: per-layer measurements: kind (dense | moe | head), shard (``tpNepM``), variant, step_ms, fwd_ms,
            act_bytes (saved for backward per micro-batch).
        spec: the model (DeepSeek-V3's published config).
        layouts: the parallel layouts to project (``Layout.check`` runs on each).
        variants: keys of ``v3_shapes.VARIANTS``.
        a: assumption overrides (name -> value; names from ``ASSUMPTIONS``).
    """
    from v3_shapes import layouts_as_dicts

    unknown = sorted(set(a or {}) - set(ASSUMPTIONS))
    if unknown:
        raise ValueError(f"unknown assumptions {unknown}; known: {sorted(ASSUMPTIONS)}")
    table = Table(rows)
    for layout in layouts:
        layout.check(spec)
    out = {
        "assumptions": {k: {"value": assumption(k, a), "why": why} for k, (_, why) in ASSUMPTIONS.items()},
        "formulas": list(FORMULAS),
        "layouts": layouts_as_dicts(layouts),
        "stage_kinds": {lay.name: stage_kinds(spec, lay) for lay in layouts},
        "results": {},
    }
    for layout in layouts:
        comm = {kind: comm_per_layer(spec, layout, kind == "moe", a) for kind in ("dense", "moe")}
        out["results"][layout.name] = {
            "comm_per_layer": comm,
            "variants": {v: project_layout(spec, layout, v, table, a) for v in variants},
        }
    return out
