"""The dimensions of an MLA (+MoE) model, in one place, read from a Megatron or an HF config.

Megatron's ``qk_head_dim`` is the nope part only; here it is written ``qk_nope_head_dim`` in full, and
``qk_rope_head_dim`` is Megatron's ``qk_pos_emb_head_dim``.
"""

import math
from dataclasses import asdict, dataclass, field


def yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1.0 or not mscale else 0.1 * mscale * math.log(scale) + 1.0


# MLASpec field -> Megatron MLATransformerConfig field, for the fields that map one to one. Both directions
# read it: ``MLASpec.from_megatron`` and ``models/from_spec.config_from_spec``; the MoE fields, whose
# absent values differ (0 here, None there), are mapped by each beside it.
MEGATRON_FIELDS = {
    "hidden_size": "hidden_size", "num_layers": "num_layers", "num_heads": "num_attention_heads",
    "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank", "qk_nope_head_dim": "qk_head_dim",
    "qk_rope_head_dim": "qk_pos_emb_head_dim", "v_head_dim": "v_head_dim", "vocab_size": "vocab_size",
    "ffn_hidden_size": "ffn_hidden_size", "norm_eps": "layernorm_epsilon", "rope_type": "rope_type",
    "rope_base": "rotary_base", "rope_factor": "rotary_scaling_factor",
    "rope_original_max_positions": "original_max_position_embeddings", "rope_beta_fast": "beta_fast",
    "rope_beta_slow": "beta_slow", "rope_mscale": "mscale", "rope_mscale_all_dim": "mscale_all_dim",
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

    @property
    def qk_head_dim(self) -> int:
        """nope + rope (DeepSeek's qk_head_dim)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """mscale^2 / sqrt(nope + rope); mscale from the yarn factor and mscale_all_dim (Megatron and HF agree)."""
        m = yarn_mscale(self.rope_factor, self.rope_mscale_all_dim)
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
        d = dict(d)
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
            num_experts=c.num_moe_experts or 0, moe_ffn_hidden_size=c.moe_ffn_hidden_size or 0,
            shared_expert_ffn_hidden_size=c.moe_shared_expert_intermediate_size or 0,
            moe_topk=c.moe_router_topk if c.num_moe_experts else 0,
            moe_num_groups=c.moe_router_num_groups or 1, moe_group_topk=c.moe_router_group_topk or 1,
            moe_scaling_factor=c.moe_router_topk_scaling_factor or 1.0, moe_layer_pattern=pattern,
        )


def spec_from_hf(config) -> MLASpec:
    """From an HF DeepSeek-V3/V2 ``config.json`` (dict or ``PretrainedConfig``)."""
    c = config if isinstance(config, dict) else config.to_dict()
    layers = c["num_hidden_layers"]
    experts = c.get("n_routed_experts") or 0
    first_dense = c.get("first_k_dense_replace", 0) if experts else layers
    rope = c.get("rope_scaling") or {}
    yarn = rope.get("type", rope.get("rope_type")) == "yarn"
    return MLASpec(
        hidden_size=c["hidden_size"], num_layers=layers, num_heads=c["num_attention_heads"],
        q_lora_rank=c.get("q_lora_rank"), kv_lora_rank=c["kv_lora_rank"], qk_nope_head_dim=c["qk_nope_head_dim"],
        qk_rope_head_dim=c["qk_rope_head_dim"], v_head_dim=c["v_head_dim"], vocab_size=c["vocab_size"],
        ffn_hidden_size=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_type="yarn" if yarn else "rope", rope_base=c.get("rope_theta", 10000.0),
        rope_factor=rope.get("factor", 1.0) if yarn else 1.0,
        rope_original_max_positions=rope.get("original_max_position_embeddings", 4096),
        rope_beta_fast=rope.get("beta_fast", 32.0), rope_beta_slow=rope.get("beta_slow", 1.0),
        rope_mscale=rope.get("mscale", 1.0), rope_mscale_all_dim=rope.get("mscale_all_dim", 1.0),
        num_experts=experts, moe_ffn_hidden_size=c.get("moe_intermediate_size", 0) if experts else 0,
        shared_expert_ffn_hidden_size=(c.get("moe_intermediate_size", 0) * (c.get("n_shared_experts") or 0)
                                       if experts else 0),
        moe_topk=c.get("num_experts_per_tok", 0) if experts else 0, moe_num_groups=c.get("n_group") or 1,
        moe_group_topk=c.get("topk_group") or 1, moe_scaling_factor=c.get("routed_scaling_factor", 1.0),
        moe_layer_pattern=tuple(0 if i < first_dense else 1 for i in range(layers)),
    )
