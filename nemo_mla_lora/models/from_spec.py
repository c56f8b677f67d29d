"""An ``MLASpec`` (what every checkpoint of ours carries in ``mla_spec.json``) -> NeMo's DeepSeek-V3 config
with the TE-free layer spec, so that a Megatron-Core model can be built for any export without its YAML."""

import torch

from nemo_mla_lora.mla_spec import MLASpec
from nemo_mla_lora.models.tiny import mla_config


def config_from_spec(spec: MLASpec, dtype: torch.dtype = torch.float32):
    moe = spec.num_experts > 0
    return mla_config(
        dtype, num_layers=spec.num_layers, hidden_size=spec.hidden_size, ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_heads, q_lora_rank=spec.q_lora_rank, kv_lora_rank=spec.kv_lora_rank,
        qk_head_dim=spec.qk_nope_head_dim, qk_pos_emb_head_dim=spec.qk_rope_head_dim, v_head_dim=spec.v_head_dim,
        vocab_size=spec.vocab_size, layernorm_epsilon=spec.norm_eps, rope_type=spec.rope_type,
        rotary_base=spec.rope_base, rotary_scaling_factor=spec.rope_factor,
        original_max_position_embeddings=spec.rope_original_max_positions, beta_fast=spec.rope_beta_fast,
        beta_slow=spec.rope_beta_slow, mscale=spec.rope_mscale, mscale_all_dim=spec.rope_mscale_all_dim,
        seq_length=spec.rope_original_max_positions, max_position_embeddings=spec.rope_original_max_positions,
        num_moe_experts=spec.num_experts or None, moe_ffn_hidden_size=spec.moe_ffn_hidden_size if moe else None,
        moe_shared_expert_intermediate_size=spec.shared_expert_ffn_hidden_size or None,
        moe_router_topk=spec.moe_topk if moe else 2, moe_router_num_groups=spec.moe_num_groups if moe else None,
        moe_router_group_topk=spec.moe_group_topk if moe else None,
        moe_router_topk_scaling_factor=spec.moe_scaling_factor if moe else None,
        moe_router_enable_expert_bias=moe,
        moe_layer_freq=list(spec.moe_layer_pattern) if moe else [0] * spec.num_layers,
    )
