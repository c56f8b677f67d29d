"""Everything that changes an MLA (+MoE) model's numbers, in one place: its dimensions, RoPE and routing.

Read from the checkpoint's own config (HF ``config.json``: ``hf_config.spec_from_hf``; our
``mla_spec.json``; a Megatron config: ``MLASpec.from_megatron``), never typed twice.
Megatron's ``qk_head_dim`` is the nope part only; here it is written ``qk_nope_head_dim`` in full, and
``qk_rope_head_dim`` is Megatron's ``qk_pos_emb_head_dim``.

Routing (DeepSeek's names): ``moe_score_function`` softmax (V2) | sigmoid (V3); ``moe_topk_method`` greedy
(V2-Lite) | group_limited_greedy (V2: groups ranked by their best expert) | noaux_tc (V3: groups ranked by
the sum of their two best biased scores, ``e_score_correction_bias`` used for the choice only);
``moe_norm_topk_prob`` renormalises the chosen weights; ``moe_scaling_factor`` multiplies them.
"""

import math
from dataclasses import asdict, dataclass, field


def yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1.0 or not mscale else 0.1 * mscale * math.log(scale) + 1.0


# MLASpec field -> Megatron MLATransformerConfig field, for the fields that map one to one. Both directions
# read it: ``MLASpec.from_megatron`` and ``models/from_spec.config_from_spec``; the MoE fields, whose
# absent values differ (0 here, None there), are mapped by each beside it.
MEGATRON_FIELDS = {
    "hidden_size": "hidden_size",
    "num_layers": "num_layers",
    "num_heads": "num_attention_heads",
    "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_head_dim",
    "qk_rope_head_dim": "qk_pos_emb_head_dim",
    "v_head_dim": "v_head_dim",
    "vocab_size": "vocab_size",
    "ffn_hidden_size": "ffn_hidden_size",
    "norm_eps": "layernorm_epsilon",
    "rope_type": "rope_type",
    "rope_base": "rotary_base",
    "rope_factor": "rotary_scaling_factor",
    "rope_original_max_positions": "original_max_position_embeddings",
    "rope_beta_fast": "beta_fast",
    "rope_beta_slow": "beta_slow",
    "rope_mscale": "mscale",
    "rope_mscale_all_dim": "mscale_all_dim",
}


@dataclass(frozen=True)
class MLASpec:
    hidden_size: int
    num_layers: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    vocab_size: int
    ffn_hidden_size: int
    norm_eps: float = 1e-6
    latent_norm_eps: float = 1e-6  # q/kv latent norms: DeepSeek's code fixes 1e-6 whatever rms_norm_eps says
    rope_type: str = "yarn"
    rope_base: float = 10000.0
    rope_factor: float = 1.0
    rope_original_max_positions: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 1.0
    rope_mscale_all_dim: float = 1.0
    num_experts: int = 0
    moe_ffn_hidden_size: int = 0
    shared_expert_ffn_hidden_size: int = 0
    moe_topk: int = 0
    moe_num_groups: int = 1
    moe_group_topk: int = 1
    moe_scaling_factor: float = 1.0
    moe_layer_pattern: tuple = field(default_factory=tuple)  # 1 = MoE layer, 0 = dense
    moe_score_function: str = "sigmoid"  # softmax | sigmoid
    moe_topk_method: str = "noaux_tc"  # greedy | group_limited_greedy | noaux_tc
    moe_norm_topk_prob: bool = True
    model_type: str = "deepseek_v3"  # the HF model_type the checkpoint came with (deepseek_v2 | deepseek_v3 | kimi_k2)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 0  # the checkpoint's; 0: rope_original_max_positions x rope_factor

    @property
    def moe_expert_bias(self) -> bool:
        """V3's ``e_score_correction_bias`` (Megatron's ``router.expert_bias``) exists with noaux_tc only."""
        return self.num_experts > 0 and self.moe_topk_method == "noaux_tc"

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings or int(self.rope_original_max_positions * max(self.rope_factor, 1.0))

    @property
    def rope_attention_factor(self) -> float:
        """The cos/sin scale of YaRN (1 for plain RoPE): mscale(factor, mscale) / mscale(factor, mscale_all_dim)."""
        if self.rope_type != "yarn":
            return 1.0
        return yarn_mscale(self.rope_factor, self.rope_mscale) / yarn_mscale(self.rope_factor, self.rope_mscale_all_dim)

    @property
    def qk_head_dim(self) -> int:
        """nope + rope (DeepSeek's qk_head_dim)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """mscale^2 / sqrt(nope + rope); mscale from the yarn factor and mscale_all_dim (Megatron and HF agree)."""
        m = yarn_mscale(self.rope_factor, self.rope_mscale_all_dim) if self.rope_type == "yarn" else 1.0
        return m * m / math.sqrt(self.qk_head_dim)

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.moe_layer_pattern and self.moe_layer_pattern[layer])

    def kv_cache_values_per_token_per_layer(self) -> dict:
        """Latent cache (c_kv + shared rope key) vs materialized K and V, values per token per layer."""
        latent = self.kv_lora_rank + self.qk_rope_head_dim
        materialized = self.num_heads * (self.qk_head_dim + self.v_head_dim)
        return {"latent": latent, "materialized": materialized}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["moe_layer_pattern"] = list(self.moe_layer_pattern)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MLASpec":
        """From ``to_dict`` output. Fields added later (routing, model type) take the V3 defaults that every
        earlier ``mla_spec.json`` had; an unknown field is an error."""
        d = dict(d)
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"mla_spec: unknown fields {unknown}")
        d["moe_layer_pattern"] = tuple(d.get("moe_layer_pattern", ()))
        return cls(**d)

    @classmethod
    def from_megatron(cls, c) -> "MLASpec":
        """From a Megatron ``MLATransformerConfig`` (e.g. NeMo's ``DeepSeekV3Config``)."""
        freq = c.moe_layer_freq
        if not c.num_moe_experts:
            pattern = (0,) * c.num_layers
        elif isinstance(freq, int):
            pattern = tuple(1 if i % freq == 0 else 0 for i in range(c.num_layers))
        else:
            pattern = tuple(int(x) for x in freq)
        return cls(
            **{ours: getattr(c, theirs) for ours, theirs in MEGATRON_FIELDS.items()},
            num_experts=c.num_moe_experts or 0,
            moe_ffn_hidden_size=c.moe_ffn_hidden_size or 0,
            shared_expert_ffn_hidden_size=c.moe_shared_expert_intermediate_size or 0,
            moe_topk=c.moe_router_topk if c.num_moe_experts else 0,
            moe_num_groups=c.moe_router_num_groups or 1,
            moe_group_topk=c.moe_router_group_topk or 1,
            moe_scaling_factor=c.moe_router_topk_scaling_factor or 1.0,
            moe_layer_pattern=pattern,
            **_megatron_routing(c),
            tie_word_embeddings=bool(c.share_embeddings_and_output_weights),
            max_position_embeddings=getattr(c, "max_position_embeddings", 0) or 0,
            model_type="deepseek_v2" if c.moe_router_score_function == "softmax" else "deepseek_v3",
            latent_norm_eps=getattr(c, "mla_latent_norm_eps", c.layernorm_epsilon),
        )


def _megatron_routing(c) -> dict:
    """Routing fields of a Megatron config (see ``models/from_spec.megatron_routing`` for the inverse)."""
    if not c.num_moe_experts:
        return {}
    if c.moe_router_score_function == "sigmoid":
        return {
            "moe_score_function": "sigmoid",
            "moe_topk_method": "noaux_tc" if c.moe_router_enable_expert_bias else "greedy",
            "moe_norm_topk_prob": True,
        }
    grouped = bool(c.moe_router_group_topk) and (c.moe_router_num_groups or 1) > 1
    if (
        grouped
        and getattr(c, "moe_router_group_score", "sum") != "max"
        and c.moe_router_topk // c.moe_router_group_topk != 1
    ):
        raise ValueError(
            "Megatron's softmax group-limited routing (groups by their top k/topk_group sum) is not "
            "DeepSeek-V2's (groups by their best expert); build the config with models/from_spec"
        )
    if not c.moe_router_pre_softmax:  # softmax over the chosen logits = chosen scores renormalised
        return {"moe_score_function": "softmax", "moe_topk_method": "greedy", "moe_norm_topk_prob": True}
    method = "group_limited_greedy" if grouped else "greedy"
    return {"moe_score_function": "softmax", "moe_topk_method": method, "moe_norm_topk_prob": False}
