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


def hf_to_megatron(state: dict) -> dict:
    """HF DeepSeek-V3 state dict -> Megatron state dict (gate/up fused back into ``linear_fc1``)."""
    out, halves = {}, {}
    inverse_params = {v: k for k, v in _PARAM_RENAMES.items()}
    for key, value in state.items():
        if "rotary_emb" in key:
            continue
        module, param = _split_param(key)
        mc, part = to_megatron_module(module)
        param = inverse_params.get(param, param)
        if part is None:
            out[f"{mc}.{param}"] = value
        else:
            halves.setdefault(f"{mc}.{param}", {})[part] = value
    for key, parts in halves.items():
        if set(parts) != {"gate", "up"}:
            raise KeyError(f"{key}: HF checkpoint has only {sorted(parts)} of gate_proj/up_proj")
        out[key] = torch.cat([parts["gate"], parts["up"]], dim=0)
    return out


def hf_config(spec, **extra):
    """An HF ``DeepseekV3Config`` for an ``MLASpec`` (what vLLM / SGLang / transformers load)."""
    from transformers import DeepseekV3Config

    first_dense = 0
    while first_dense < spec.num_layers and not spec.is_moe_layer(first_dense):
        first_dense += 1
    if spec.num_experts and any(spec.is_moe_layer(i) != (i >= first_dense) for i in range(spec.num_layers)):
        raise ValueError(f"HF DeepSeek-V3 needs dense layers first, then MoE; got {spec.moe_layer_pattern}")
    rope_scaling = None
    if spec.rope_type == "yarn":
        rope_scaling = {
            "type": "yarn", "rope_type": "yarn", "factor": spec.rope_factor,
            "original_max_position_embeddings": spec.rope_original_max_positions,
            "beta_fast": spec.rope_beta_fast, "beta_slow": spec.rope_beta_slow,
            "mscale": spec.rope_mscale, "mscale_all_dim": spec.rope_mscale_all_dim,
        }
    n_shared = spec.shared_expert_ffn_hidden_size // spec.moe_ffn_hidden_size if spec.num_experts else 0
    return DeepseekV3Config(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.ffn_hidden_size,
        moe_intermediate_size=spec.moe_ffn_hidden_size or 1, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
        n_shared_experts=n_shared, n_routed_experts=spec.num_experts or 1,
        routed_scaling_factor=spec.moe_scaling_factor, kv_lora_rank=spec.kv_lora_rank,
        q_lora_rank=spec.q_lora_rank, qk_rope_head_dim=spec.qk_rope_head_dim, v_head_dim=spec.v_head_dim,
        qk_nope_head_dim=spec.qk_nope_head_dim, n_group=spec.moe_num_groups, topk_group=spec.moe_group_topk,
        num_experts_per_tok=spec.moe_topk or 1, first_k_dense_replace=first_dense if spec.num_experts else spec.num_layers,
        norm_topk_prob=True, rms_norm_eps=spec.norm_eps, rope_theta=spec.rope_base, rope_scaling=rope_scaling,
        rope_interleave=True, tie_word_embeddings=False,
        max_position_embeddings=int(spec.rope_original_max_positions * max(spec.rope_factor, 1.0)),
        **extra,
    )
