"""The one place that translates Megatron-Core names <-> HF DeepSeek-V3 names.

Megatron fuses the gated MLP's gate and up projections into ``linear_fc1`` ([gate; up] rows); HF keeps
``gate_proj`` and ``up_proj``. Everything else is a rename.
"""

import re

import torch

# (Megatron module suffix, HF module suffix(es)) inside one decoder layer; {e} is an expert index.
_LAYER_MODULES = [
    ("input_layernorm", ["input_layernorm"]),
    ("self_attention.linear_q_down_proj", ["self_attn.q_a_proj"]),
    ("self_attention.q_layernorm", ["self_attn.q_a_layernorm"]),
    ("self_attention.linear_q_up_proj", ["self_attn.q_b_proj"]),
    ("self_attention.linear_q_proj", ["self_attn.q_proj"]),
    ("self_attention.linear_kv_down_proj", ["self_attn.kv_a_proj_with_mqa"]),
    ("self_attention.kv_layernorm", ["self_attn.kv_a_layernorm"]),
    ("self_attention.linear_kv_up_proj", ["self_attn.kv_b_proj"]),
    ("self_attention.linear_proj", ["self_attn.o_proj"]),
    ("pre_mlp_layernorm", ["post_attention_layernorm"]),
    ("mlp.linear_fc1", ["mlp.gate_proj", "mlp.up_proj"]),
    ("mlp.linear_fc2", ["mlp.down_proj"]),
    ("mlp.router", ["mlp.gate"]),
    ("mlp.experts.local_experts.{e}.linear_fc1", ["mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"]),
    ("mlp.experts.local_experts.{e}.linear_fc2", ["mlp.experts.{e}.down_proj"]),
    ("mlp.shared_experts.linear_fc1", ["mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"]),
    ("mlp.shared_experts.linear_fc2", ["mlp.shared_experts.down_proj"]),
]


def _template_re(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{e\}", r"(?P<e>\d+)"))


_TOP_MODULES = [
    ("embedding.word_embeddings", "model.embed_tokens"),
    ("decoder.final_layernorm", "model.norm"),
    ("output_layer", "lm_head"),
]
_PARAM_RENAMES = {"expert_bias": "e_score_correction_bias"}  # router buffer
_LAYER_RE = re.compile(r"^(?:.*\.)?decoder\.layers\.(\d+)\.(.+)$")


def to_hf_modules(name: str) -> list[str]:
    """HF module name(s) for a Megatron module name (two for a fused gate/up ``linear_fc1``)."""
    for mc, hf in _TOP_MODULES:
        if name == mc or name.endswith("." + mc):
            return [hf]
    m = _LAYER_RE.match(name)
    if m:
        layer, rest = m.groups()
        for mc, hf_names in _LAYER_MODULES:
            mm = _template_re(mc).fullmatch(rest)
            if mm:
                return [f"model.layers.{layer}." + h.format(**mm.groupdict()) for h in hf_names]
    raise KeyError(f"no HF name for Megatron module {name!r}")


def to_megatron_module(hf_name: str) -> tuple[str, str | None]:
    """(Megatron module name, 'gate' | 'up' | None) for an HF module name."""
    for mc, hf in _TOP_MODULES:
        if hf_name == hf:
            return mc, None
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if m:
        layer, rest = m.groups()
        for mc, hf_names in _LAYER_MODULES:
            for i, h in enumerate(hf_names):
                hm = _template_re(h).fullmatch(rest)
                if hm:
                    part = None if len(hf_names) == 1 else ("gate", "up")[i]
                    return f"decoder.layers.{layer}." + mc.format(**hm.groupdict()), part
    raise KeyError(f"no Megatron name for HF module {hf_name!r}")


# Transformer Engine layer spec (how NeMo's DeepSeek recipes build the model) fuses three norms into the linear
# after them; the local spec (ours) keeps them as modules. Same tensors, other names.
_TE_FUSED_NORMS = [
    (re.compile(r"^(.*\.self_attention)\.linear_q_up_proj\.layer_norm_weight$"), r"\1.q_layernorm.weight"),
    (re.compile(r"^(.*\.self_attention)\.linear_kv_up_proj\.layer_norm_weight$"), r"\1.kv_layernorm.weight"),
    (re.compile(r"^(.*\.layers\.\d+)\.mlp\.linear_fc1\.layer_norm_weight$"), r"\1.pre_mlp_layernorm.weight"),
]
_LOCAL_NORMS = [
    (re.compile(r"^(.*\.self_attention)\.q_layernorm\.weight$"), r"\1.linear_q_up_proj.layer_norm_weight"),
    (re.compile(r"^(.*\.self_attention)\.kv_layernorm\.weight$"), r"\1.linear_kv_up_proj.layer_norm_weight"),
]


def from_te_name(name: str) -> str:
    """A Transformer-Engine-spec tensor name -> the local spec's (unchanged when nothing is fused)."""
    for pattern, local in _TE_FUSED_NORMS:
        if pattern.match(name):
            return pattern.sub(local, name)
    return name


_TE_GROUPED_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(linear_fc[12])\.(weight|bias)(\d+)$")


def from_te_state_name(name: str) -> str | None:
    """A TE-spec model's ``state_dict`` name -> the local spec's flat name; None for ``_extra_state``. Besides the
    fused norms (``from_te_name``), ``TEGroupedMLP`` keeps expert e's weight as ``...mlp.experts.linear_fc1.weight{e}``
    where ``SequentialMLP`` has ``...mlp.experts.local_experts.{e}.linear_fc1.weight``."""
    if name.endswith("_extra_state"):
        return None
    m = _TE_GROUPED_EXPERT.match(name)
    if m:
        return f"{m.group(1)}.local_experts.{m.group(4)}.{m.group(2)}.{m.group(3)}"
    return from_te_name(name)


_STACKED_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.experts\.(linear_fc[12]\.[^.]+)$")


def from_sharded_key(key: str, expert: int | None = None) -> str:
    """A key of a Megatron model's ``sharded_state_dict`` (TE or local spec) -> the local spec's flat name. Routed
    experts (``SequentialMLP`` and ``TEGroupedMLP`` alike) share one stacked key ``...mlp.experts.experts.linear_fc1
    .weight`` whose leading axis is the global expert index: ``expert`` names it. Layer numbers are global (Megatron
    offsets them by the pipeline stage's first layer)."""
    m = _STACKED_EXPERT.match(key)
    if m:
        if expert is None:
            raise KeyError(f"{key}: a stacked expert key needs the expert index")
        return f"{m.group(1)}.local_experts.{expert}.{m.group(2)}"
    return from_te_name(key)


def is_stacked_expert_key(key: str) -> bool:
    return _STACKED_EXPERT.match(key) is not None


def to_te_name(name: str, dense_layers: set) -> str:
    """The local spec's name -> the TE spec's (``pre_mlp_layernorm`` fuses into ``linear_fc1`` in ``dense_layers``
    only: an MoE layer keeps its norm)."""
    for pattern, te in _LOCAL_NORMS:
        if pattern.match(name):
            return pattern.sub(te, name)
    m = re.match(r"^(.*\.layers\.(\d+))\.pre_mlp_layernorm\.weight$", name)
    if m and int(m.group(2)) in dense_layers:
        return f"{m.group(1)}.mlp.linear_fc1.layer_norm_weight"
    return name


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def megatron_to_hf(state: dict) -> dict:
    """Megatron state dict -> HF DeepSeek-V3 state dict (``_extra_state`` entries dropped)."""
    out = {}
    for key, value in state.items():
        if key.endswith("_extra_state") or value is None:
            continue
        module, param = _split_param(key)
        hf_modules = to_hf_modules(module)
        param = _PARAM_RENAMES.get(param, param)
        if len(hf_modules) == 1:
            out[f"{hf_modules[0]}.{param}"] = value
        else:  # linear_fc1 rows [gate; up]
            gate, up = torch.chunk(value, 2, dim=0)
            out[f"{hf_modules[0]}.{param}"] = gate
            out[f"{hf_modules[1]}.{param}"] = up
    return out


def to_megatron_tensor(hf_name: str) -> tuple[str, str | None]:
    """(flat Megatron tensor name, 'gate' | 'up' | None) for an HF tensor name: a gate or up tensor is that
    half of the fused ``linear_fc1`` rows ([gate; up])."""
    module, param = _split_param(hf_name)
    mc, part = to_megatron_module(module)
    return f"{mc}.{_INVERSE_PARAMS.get(param, param)}", part


_INVERSE_PARAMS = {v: k for k, v in _PARAM_RENAMES.items()}


def hf_to_megatron(state: dict) -> dict:
    """HF DeepSeek-V3 state dict -> Megatron state dict (gate/up fused back into ``linear_fc1``)."""
    out, halves = {}, {}
    for key, value in state.items():
        if "rotary_emb" in key:
            continue
        name, part = to_megatron_tensor(key)
        if part is None:
            out[name] = value
        else:
            halves.setdefault(name, {})[part] = value
    for key, parts in halves.items():
        if set(parts) != {"gate", "up"}:
            raise KeyError(f"{key}: HF checkpoint has only {sorted(parts)} of gate_proj/up_proj")
        out[key] = torch.cat([parts["gate"], parts["up"]], dim=0)
    return out
