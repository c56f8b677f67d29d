"""DeepSeek-V3's weights as Megatron-Core 0.15.3's TE spec splits them, and the parallel layouts projected.

Sharding: q/kv down projections, norms and the router are duplicated on every TP rank; q/kv up, the output
projection, dense MLPs and shared experts are split by TP; routed experts by EP x ETP; embedding and output layer
by TP (vocabulary padded to a multiple of 1280 x TP, as NeMo's ``get_vocab_size``). Adapters (MLALoRA,
``peft/adapter.py``): A whole and B split for a column-parallel base, A split and B whole for a row-parallel one,
both whole for a duplicated one.
"""

from dataclasses import asdict, dataclass

from nemo_mla_lora.arch.mla_spec import MLASpec
from nemo_mla_lora.peft.placements import PLACEMENTS

VARIANTS = {"frozen": (None, 0), "nemo_official": ("nemo_official", 32), "all_linear_r64": ("all_linear", 64)}


@dataclass(frozen=True)
class Linear:
    leaf: str  # Megatron leaf name (what a placement targets)
    role: str  # attention | dense | shared | routed | router
    fan_in: int
    fan_out: int
    split: str  # dup | col | row (TP) | ecol | erow (experts: EP x ETP)
    count: int = 1  # routed experts: the number of experts


def layer_linears(spec: MLASpec, moe: bool) -> list[Linear]:
    """Every weight matrix of one decoder layer, as Megatron's TE spec builds it."""
    h, heads, c, dr = spec.hidden_size, spec.num_heads, spec.kv_lora_rank, spec.qk_rope_head_dim
    qk, v = spec.qk_nope_head_dim + dr, spec.v_head_dim
    out = []
    if spec.q_lora_rank:
        out += [
            Linear("linear_q_down_proj", "attention", h, spec.q_lora_rank, "dup"),
            Linear("linear_q_up_proj", "attention", spec.q_lora_rank, heads * qk, "col"),
        ]
    else:
        out.append(Linear("linear_q_proj", "attention", h, heads * qk, "col"))
    out += [
        Linear("linear_kv_down_proj", "attention", h, c + dr, "dup"),
        Linear("linear_kv_up_proj", "attention", c, heads * (spec.qk_nope_head_dim + v), "col"),
        Linear("linear_proj", "attention", heads * v, h, "row"),
    ]
    if not moe:
        f = spec.ffn_hidden_size
        return out + [Linear("linear_fc1", "dense", h, 2 * f, "col"), Linear("linear_fc2", "dense", f, h, "row")]
    f, e, fs = spec.moe_ffn_hidden_size, spec.num_experts, spec.shared_expert_ffn_hidden_size
    out += [
        Linear("router", "router", h, e, "dup"),
        Linear("linear_fc1", "routed", h, 2 * f, "ecol", e),
        Linear("linear_fc2", "routed", f, h, "erow", e),
    ]
    if fs:
        out += [Linear("linear_fc1", "shared", h, 2 * fs, "col"), Linear("linear_fc2", "shared", fs, h, "row")]
    return out


def norm_params(spec: MLASpec) -> int:
    """input, q latent, kv latent and pre-MLP norms of one layer (duplicated on every rank)."""
    return 2 * spec.hidden_size + (spec.q_lora_rank or 0) + spec.kv_lora_rank


def _div(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what}: {n} does not divide by {d}")
    return n // d


def layer_params(spec: MLASpec, moe: bool, tp: int = 1, ep: int = 1, etp: int = 1) -> dict:
    """One rank's parameters of one layer: {role: count, 'fp8_eligible': decoder linears, 'total': all}."""
    out = {"norms": norm_params(spec)}
    for lin in layer_linears(spec, moe):
        n = lin.fan_in * lin.fan_out
        if lin.split in ("col", "row"):
            n = _div(n, tp, f"{lin.leaf} ({lin.role}) over TP {tp}")
        elif lin.split in ("ecol", "erow"):
            n = _div(n, etp, f"{lin.leaf} over ETP {etp}") * _div(lin.count, ep, f"experts over EP {ep}")
        out[lin.role] = out.get(lin.role, 0) + n
    out["fp8_eligible"] = sum(v for k, v in out.items() if k not in ("norms", "router"))
    out["total"] = out["fp8_eligible"] + out["norms"] + out.get("router", 0)
    return out


def layer_trainable(spec: MLASpec, moe: bool, variant: str, tp: int = 1, ep: int = 1, etp: int = 1) -> int:
    """One rank's adapter parameters of one layer for ``variant`` (see the module docstring for the split)."""
    placement, r = VARIANTS[variant]
    if placement is None:
        return 0
    targets = set(PLACEMENTS[placement].targets)
    total = 0
    for lin in layer_linears(spec, moe):
        if lin.leaf not in targets:
            continue
        a, b = lin.fan_in, lin.fan_out
        if lin.split == "col" or lin.split == "ecol":
            b = _div(b, tp if lin.split == "col" else etp, lin.leaf)
        elif lin.split in ("row", "erow"):
            a = _div(a, tp if lin.split == "row" else etp, lin.leaf)
        total += r * (a + b) * (lin.count // ep if lin.split in ("ecol", "erow") else 1)
    return total


def padded_vocab(vocab: int, tp: int, multiple: int = 1280) -> int:
    step = multiple * tp
    return (vocab + step - 1) // step * step


@dataclass(frozen=True)
class Layout:
    name: str
    tp: int
    pp: int
    ep: int
    etp: int
    gpus: int
    stage_layers: tuple
    global_batch: int
    micro_batch: int
    seq: int
    recompute: str = "none"  # none | full
    source: str = ""

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def microbatches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

    def check(self, spec: MLASpec) -> None:
        """Megatron's divisibility rules; the error names the layout and the field."""
        problems = []
        if self.gpus % (self.tp * self.pp):
            problems.append(f"gpus {self.gpus} % (tp {self.tp} x pp {self.pp})")
        elif (self.tp * self.dp) % (self.ep * self.etp):
            problems.append(f"tp x dp {self.tp * self.dp} % (ep {self.ep} x etp {self.etp})")
        elif self.global_batch % (self.micro_batch * self.dp):
            problems.append(f"global_batch {self.global_batch} % (micro_batch x dp {self.dp})")
        if len(self.stage_layers) != self.pp or sum(self.stage_layers) != spec.num_layers:
            problems.append(f"stage_layers {list(self.stage_layers)}: {self.pp} stages of {spec.num_layers} layers")
        if spec.num_heads % self.tp or spec.num_experts % self.ep:
            problems.append(f"heads {spec.num_heads} % tp or experts {spec.num_experts} % ep")
        if problems:
            raise ValueError(f"layout {self.name}: " + "; ".join(problems) + " is not 0 / does not match")


def nemo_stage_split(num_layers: int, pp: int, first: int | None, last: int | None) -> tuple:
    """Megatron's split with num_layers_in_first/last_pipeline_stage: the rest evenly over the middle stages."""
    first = first if first is not None else num_layers // pp
    last = last if last is not None else num_layers // pp
    middle = num_layers - first - last
    if pp > 2 and middle % (pp - 2):
        raise ValueError(f"{middle} middle layers do not split evenly over {pp - 2} stages")
    return (first,) + (middle // (pp - 2),) * (pp - 2) + (last,) if pp > 1 else (num_layers,)


def official_layout() -> Layout:
    """NeMo 2.7.3 ``deepseek_v3.finetune_recipe(peft_scheme='lora')``, read from this package's own
    ``model=deepseek_v3 trainer=megatron`` config (``tests/recipes/test_configs.py`` holds it equal to the recipe)."""
    from nemo_mla_lora.config.compose import compose

    cfg = compose("finetune", ["model=deepseek_v3", "trainer=megatron", "data.tokenizer=byte"])
    t = cfg.trainer
    split = nemo_stage_split(61, t.pipeline_parallel, t.layers_in_first_pipeline_stage, t.layers_in_last_pipeline_stage)
    return Layout(
        "nemo_official_tp8_pp5_ep1",
        t.tensor_parallel,
        t.pipeline_parallel,
        t.expert_parallel,
        t.tensor_parallel,
        t.devices * t.num_nodes,
        split,
        t.global_batch_size,
        t.micro_batch_size,
        cfg.data.seq_length,
        source="NeMo 2.7.3 deepseek_v3.finetune_recipe(peft_scheme='lora'): TP 8, "
        "PP 5 (13 / 12 layers first / last), EP 1, SP, SQuAD seq 2048, global batch 128, micro batch 1",
    )


def ep_layouts(official: Layout) -> list[Layout]:
    """EP alternatives: the same 40 GPUs as TP 1 x EP 8 x PP 5 (DP 8), with and without full recompute, and
    64 GPUs as TP 1 x EP 32 x PP 2 (DP 32, experts across 4 nodes) with full recompute."""
    same = dict(global_batch=official.global_batch, micro_batch=official.micro_batch, seq=official.seq)
    why = "EP alternative (not a NeMo recipe): "
    return [
        Layout("tp1_pp5_ep8", 1, 5, 8, 1, 40, official.stage_layers, **same, source=why + "40 GPUs, DP 8"),
        Layout(
            "tp1_pp5_ep8_recompute",
            1,
            5,
            8,
            1,
            40,
            official.stage_layers,
            **same,
            recompute="full",
            source=why + "40 GPUs, DP 8, full activation recompute",
        ),
        Layout(
            "tp1_pp2_ep32_recompute",
            1,
            2,
            32,
            1,
            64,
            (31, 30),
            **same,
            recompute="full",
            source=why + "64 GPUs, DP 32, EP across 4 nodes, full activation recompute",
        ),
    ]


def stage_kinds(spec: MLASpec, layout: Layout) -> list[dict]:
    """Per stage: how many dense and MoE layers it holds (layers in order over the stages)."""
    out, start = [], 0
    for n in layout.stage_layers:
        moe = sum(spec.is_moe_layer(i) for i in range(start, start + n))
        out.append({"dense": n - moe, "moe": moe})
        start += n
    return out


def shard_name(tp: int, ep: int) -> str:
    return f"tp{tp}ep{ep}"


def layouts_as_dicts(layouts: list[Layout]) -> list[dict]:
    return [dict(asdict(lay), dp=lay.dp, microbatches=lay.microbatches) for lay in layouts]
