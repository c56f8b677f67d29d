"""HF DeepSeek ``config.json`` <-> ``MLASpec``: the one place that reads and writes the HF architecture fields.

Reading is strict: every field that changes the numbers is read for ``model_type`` deepseek_v2 (V2, V2-Lite,
V2.5), deepseek_v3 (V3, V3.1, R1, Moonlight) and kimi_k2 (the V3 architecture), and a value this project
cannot reproduce exactly is refused with the field named, never approximated. Writing keeps the source's
own ``config.json`` (model_type, positions, tokens ids, quantization dropped) and changes only what the
export changed (dtype).
"""

from nemo_mla_lora.arch.mla_spec import MLASpec

MODEL_TYPES = {"deepseek_v2": "deepseek_v2", "deepseek_v3": "deepseek_v3", "kimi_k2": "deepseek_v3"}
TOPK_METHODS = {"greedy", "group_limited_greedy", "noaux_tc"}


class UnsupportedConfig(ValueError):
    """A checkpoint config whose numbers this project would not reproduce exactly."""


def _refuse(source: str, field: str, value, why: str):
    raise UnsupportedConfig(f"{source}: {field}={value!r} is not supported: {why}")


def _rope_fields(c: dict, source: str) -> dict:
    rope = c.get("rope_scaling")
    if c.get("rope_interleave", True) is not True:
        _refuse(
            source,
            "rope_interleave",
            c["rope_interleave"],
            "DeepSeek checkpoints store the rope dims interleaved; a de-interleaved conversion is not read",
        )
    if not rope:
        return {"rope_type": "rope", "rope_factor": 1.0, "rope_mscale": 1.0, "rope_mscale_all_dim": 0.0}
    kind = rope.get("rope_type", rope.get("type"))
    if kind != "yarn":
        _refuse(source, "rope_scaling.type", kind, "only plain RoPE (rope_scaling null) and yarn are implemented")
    for key in ("attention_factor",):
        if rope.get(key) is not None:
            _refuse(source, f"rope_scaling.{key}", rope[key], "DeepSeek's YaRN derives it from mscale/mscale_all_dim")
    if rope.get("truncate", True) is not True:
        _refuse(source, "rope_scaling.truncate", rope["truncate"], "DeepSeek's YaRN rounds the correction range")
    mscale, mscale_all_dim = rope.get("mscale") or 0.0, rope.get("mscale_all_dim") or 0.0
    if mscale_all_dim and not mscale:
        _refuse(
            source,
            "rope_scaling.mscale",
            rope.get("mscale"),
            "with mscale_all_dim set, transformers and Megatron-Core compute the rope scale differently without mscale",
        )
    return {
        "rope_type": "yarn",
        "rope_factor": float(rope["factor"]),
        "rope_original_max_positions": int(
            rope.get("original_max_position_embeddings") or c["max_position_embeddings"]
        ),
        "rope_beta_fast": float(rope.get("beta_fast") or 32),
        "rope_beta_slow": float(rope.get("beta_slow") or 1),
        "rope_mscale": float(mscale or 1.0),
        "rope_mscale_all_dim": float(mscale_all_dim),
    }


def _moe_fields(c: dict, family: str, source: str) -> dict:
    experts = c.get("n_routed_experts") or 0
    layers = c["num_hidden_layers"]
    if not experts:
        return {"moe_layer_pattern": (0,) * layers}
    score = c.get("scoring_func", "softmax" if family == "deepseek_v2" else "sigmoid")
    method = c.get("topk_method", "greedy" if family == "deepseek_v2" else "noaux_tc")
    norm = bool(c.get("norm_topk_prob", family != "deepseek_v2"))
    groups, group_topk, topk = c.get("n_group") or 1, c.get("topk_group") or 1, c["num_experts_per_tok"]
    _check_routing(source, experts, score, method, norm, groups, group_topk, topk)
    freq, first_dense = c.get("moe_layer_freq", 1), c.get("first_k_dense_replace", 0)
    return {
        "num_experts": experts,
        "moe_ffn_hidden_size": c["moe_intermediate_size"],
        "shared_expert_ffn_hidden_size": c["moe_intermediate_size"] * (c.get("n_shared_experts") or 0),
        "moe_topk": topk,
        "moe_num_groups": groups,
        "moe_group_topk": group_topk,
        "moe_scaling_factor": float(c.get("routed_scaling_factor") or 1.0),
        "moe_layer_pattern": tuple(int(i >= first_dense and i % freq == 0) for i in range(layers)),
        "moe_score_function": score,
        "moe_topk_method": method if groups > 1 or method == "noaux_tc" else "greedy",
        "moe_norm_topk_prob": norm,
    }


def _check_routing(source: str, experts, score, method, norm, groups, group_topk, topk) -> None:
    """The router's settings that DeepSeek's models pair and Megatron-Core computes as DeepSeek does; refuses
    the others, naming the field."""
    if method not in TOPK_METHODS:
        _refuse(source, "topk_method", method, f"expected one of {sorted(TOPK_METHODS)}")
    if (score, method) not in {("softmax", "greedy"), ("softmax", "group_limited_greedy"), ("sigmoid", "noaux_tc")}:
        _refuse(
            source,
            "scoring_func/topk_method",
            (score, method),
            "DeepSeek's models pair softmax with greedy or group_limited_greedy and sigmoid with noaux_tc",
        )
    if score == "softmax" and norm:
        _refuse(
            source,
            "norm_topk_prob",
            True,
            "with softmax routing transformers ignores it and DeepSeek's code "
            "normalises instead of scaling; no released V2 model sets it",
        )
    if score == "sigmoid" and not norm:
        _refuse(source, "norm_topk_prob", False, "Megatron-Core's sigmoid router always renormalises")
    if experts % groups:
        _refuse(source, "n_group", groups, f"does not divide n_routed_experts={experts}")
    if method == "noaux_tc" and groups > 1 and topk // group_topk != 2:
        _refuse(
            source,
            "topk_group",
            group_topk,
            f"DeepSeek-V3 ranks groups by their 2 best experts, Megatron-Core "
            f"by num_experts_per_tok // topk_group = {topk // group_topk}",
        )


def spec_from_hf(config, source: str = "config.json") -> MLASpec:
    """From an HF DeepSeek-V2/V3 ``config.json`` (dict or ``PretrainedConfig``); refuses what it cannot reproduce."""
    c = config if isinstance(config, dict) else config.to_dict()
    try:
        return _spec_from_hf(c, source)
    except KeyError as err:
        raise UnsupportedConfig(f"{source}: missing field {err}") from None
    except (TypeError, ValueError) as err:
        if isinstance(err, UnsupportedConfig):
            raise
        raise UnsupportedConfig(f"{source}: a field has the wrong type or value ({err})") from None


def _spec_from_hf(c: dict, source: str) -> MLASpec:
    family = MODEL_TYPES.get(c.get("model_type"))
    if family is None:
        _refuse(source, "model_type", c.get("model_type"), f"expected one of {sorted(MODEL_TYPES)}")
    if c.get("hidden_act", "silu") != "silu":
        _refuse(source, "hidden_act", c["hidden_act"], "DeepSeek's gated MLP uses silu")
    for field in ("attention_bias", "mlp_bias"):
        if c.get(field):
            _refuse(source, field, c[field], "DeepSeek's linears have no bias")
    quant = c.get("quantization_config")
    if quant and (quant.get("quant_method") != "fp8" or list(quant.get("weight_block_size", [128, 128])) != [128, 128]):
        _refuse(source, "quantization_config", quant, "only DeepSeek's FP8 with 128x128 block scales is read")
    heads = c["num_attention_heads"]
    if c.get("num_key_value_heads", heads) != heads:
        _refuse(source, "num_key_value_heads", c["num_key_value_heads"], f"MLA has one K/V per head ({heads})")
    return MLASpec(
        hidden_size=c["hidden_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=heads,
        q_lora_rank=c.get("q_lora_rank"),
        kv_lora_rank=c["kv_lora_rank"],
        qk_nope_head_dim=c["qk_nope_head_dim"],
        qk_rope_head_dim=c["qk_rope_head_dim"],
        v_head_dim=c["v_head_dim"],
        vocab_size=c["vocab_size"],
        ffn_hidden_size=c["intermediate_size"],
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope_base=float(c.get("rope_theta", 10000.0)),
        **_rope_fields(c, source),
        **_moe_fields(c, family, source),
        model_type=c["model_type"],
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        max_position_embeddings=int(c["max_position_embeddings"]),
    )


def _first_dense(spec: MLASpec) -> int:
    first = 0
    while first < spec.num_layers and not spec.is_moe_layer(first):
        first += 1
    if spec.num_experts and any(spec.is_moe_layer(i) != (i >= first) for i in range(spec.num_layers)):
        raise ValueError(f"HF DeepSeek needs dense layers first, then MoE; got {spec.moe_layer_pattern}")
    return first if spec.num_experts else spec.num_layers


def hf_config_dict(spec: MLASpec, dtype: str, source: dict | None = None) -> dict:
    """``config.json`` for a merged export: the source checkpoint's own (``source``) with ``torch_dtype`` set to
    what was written and the quantization dropped, or, for a base of ours, one built from ``spec``. Either way
    it must read back as ``spec`` (checked)."""
    if source is not None:
        out = {k: v for k, v in source.items() if k != "quantization_config"}
    else:
        out = _config_from_spec(spec)
    out["torch_dtype"] = out["dtype"] = dtype  # transformers < 4.56 and vLLM read torch_dtype, later ones dtype
    back = spec_from_hf(out, "the written config.json")
    if back != spec:
        diff = {k: (v, getattr(back, k)) for k, v in spec.to_dict().items() if back.to_dict()[k] != v}
        raise ValueError(f"config.json would not read back as the exported model: (spec, config) differ in {diff}")
    return out


def _config_from_spec(spec: MLASpec) -> dict:
    rope_scaling = _rope_scaling(spec)
    shared = _shared_experts(spec)
    arch = "DeepseekV2ForCausalLM" if spec.model_type == "deepseek_v2" else "DeepseekV3ForCausalLM"
    return {
        "architectures": [arch],
        "model_type": spec.model_type,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.ffn_hidden_size,
        "moe_intermediate_size": spec.moe_ffn_hidden_size or 1,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_heads,
        "n_shared_experts": shared or None,
        "n_routed_experts": spec.num_experts or None,
        "routed_scaling_factor": spec.moe_scaling_factor,
        "kv_lora_rank": spec.kv_lora_rank,
        "q_lora_rank": spec.q_lora_rank,
        "qk_rope_head_dim": spec.qk_rope_head_dim,
        "v_head_dim": spec.v_head_dim,
        "qk_nope_head_dim": spec.qk_nope_head_dim,
        "n_group": spec.moe_num_groups,
        "topk_group": spec.moe_group_topk,
        "num_experts_per_tok": spec.moe_topk or None,
        "first_k_dense_replace": _first_dense(spec),
        "moe_layer_freq": 1,
        "norm_topk_prob": spec.moe_norm_topk_prob,
        "scoring_func": spec.moe_score_function,
        "topk_method": spec.moe_topk_method,
        "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_base,
        "rope_scaling": rope_scaling,
        "rope_interleave": True,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "max_position_embeddings": spec.max_positions,
        "hidden_act": "silu",
        "attention_bias": False,
    }


def _rope_scaling(spec: MLASpec) -> dict | None:
    """HF's ``rope_scaling`` of a YaRN spec (None for plain RoPE)."""
    if spec.rope_type != "yarn":
        return None
    return {
        "type": "yarn",
        "rope_type": "yarn",
        "factor": spec.rope_factor,
        "original_max_position_embeddings": spec.rope_original_max_positions,
        "beta_fast": spec.rope_beta_fast,
        "beta_slow": spec.rope_beta_slow,
        "mscale": spec.rope_mscale,
        "mscale_all_dim": spec.rope_mscale_all_dim,
    }


def _shared_experts(spec: MLASpec) -> int:
    """HF's ``n_shared_experts``: the shared expert's width in routed-expert widths (0 without experts)."""
    if spec.num_experts <= 0:
        return 0
    shared = spec.shared_expert_ffn_hidden_size // spec.moe_ffn_hidden_size
    if shared * spec.moe_ffn_hidden_size != spec.shared_expert_ffn_hidden_size:
        raise ValueError(
            f"shared expert width {spec.shared_expert_ffn_hidden_size} is not a multiple of the expert "
            f"width {spec.moe_ffn_hidden_size}: HF DeepSeek cannot express it"
        )
    return shared


def hf_model_config(spec: MLASpec, source: dict | None = None):
    """A transformers ``PretrainedConfig`` (DeepseekV2Config / DeepseekV3Config) for ``spec``."""
    from transformers import AutoConfig

    d = hf_config_dict(spec, "float32", source)
    d.pop("torch_dtype"), d.pop("dtype")
    return AutoConfig.for_model(MODEL_TYPES[d.pop("model_type")], **d)
