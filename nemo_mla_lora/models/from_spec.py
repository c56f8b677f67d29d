"""An ``MLASpec`` (what every checkpoint of ours carries in ``mla_spec.json``) -> NeMo's DeepSeek-V3 config
with the TE-free layer spec, so that a Megatron-Core model can be built for any export without its YAML."""

import torch

from nemo_mla_lora.mla_spec import MEGATRON_FIELDS, MLASpec
from nemo_mla_lora.models.tiny import mla_config


def config_from_spec(spec: MLASpec, dtype: torch.dtype = torch.float32):
    moe = spec.num_experts > 0
    return mla_config(
        dtype, **{theirs: getattr(spec, ours) for ours, theirs in MEGATRON_FIELDS.items()},
        seq_length=spec.rope_original_max_positions, max_position_embeddings=spec.rope_original_max_positions,
        num_moe_experts=spec.num_experts or None, moe_ffn_hidden_size=spec.moe_ffn_hidden_size if moe else None,
        moe_shared_expert_intermediate_size=spec.shared_expert_ffn_hidden_size or None,
        moe_router_topk=spec.moe_topk if moe else 2, moe_router_num_groups=spec.moe_num_groups if moe else None,
        moe_router_group_topk=spec.moe_group_topk if moe else None,
        moe_router_topk_scaling_factor=spec.moe_scaling_factor if moe else None,
        moe_router_enable_expert_bias=moe,
        moe_layer_freq=list(spec.moe_layer_pattern) if moe else [0] * spec.num_layers,
    )
