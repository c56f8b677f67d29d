"""The ``model`` config group -> NeMo's DeepSeek config (Megatron-Core ``MLATransformerConfig``)."""

import torch

from nemo_mla_lora import te_compat
from nemo_mla_lora.models.layer_spec import local_mla_block_spec
from nemo_mla_lora.models.tiny import CPU_SAFE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def nemo_model_config(model_cfg, trainer_cfg=None):
    """DeepSeekV3Config / DeepSeekV2Config with the model's dims and the trainer's parallel layout.
    Without Transformer Engine (CPU, or a GPU image without it) the local MLA spec and no fusions."""
    from nemo.collections.llm import DeepSeekV2Config, DeepSeekV3Config

    m = model_cfg
    dtype = DTYPES[m.dtype]
    layers, dense = m.num_layers, m.first_dense_layers
    args = dict(
        num_layers=layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank,
        qk_head_dim=m.qk_head_dim, qk_pos_emb_head_dim=m.qk_pos_emb_head_dim, v_head_dim=m.v_head_dim,
        num_moe_experts=m.num_moe_experts, moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
        moe_router_topk=m.moe_router_topk, moe_router_num_groups=m.moe_router_num_groups,
        moe_router_group_topk=m.moe_router_group_topk,
        moe_router_topk_scaling_factor=m.moe_router_topk_scaling_factor,
        moe_router_score_function=m.moe_router_score_function,
        moe_router_enable_expert_bias=m.moe_router_score_function == "sigmoid" and bool(m.num_moe_experts),
        moe_layer_freq=[0] * dense + [1] * (layers - dense) if m.num_moe_experts else [0] * layers,
        vocab_size=m.vocab_size, seq_length=m.seq_length, max_position_embeddings=m.seq_length,
        rotary_scaling_factor=m.rotary_scaling_factor, original_max_position_embeddings=m.original_max_position_embeddings,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
    )
    if not m.num_moe_experts:
        args.update(moe_ffn_hidden_size=None, moe_shared_expert_intermediate_size=None,
                    moe_router_num_groups=None, moe_router_group_topk=None)
    if te_compat.apply():  # Transformer Engine absent: its shims, the local spec, no fusions
        args.update(CPU_SAFE, transformer_layer_spec=local_mla_block_spec)
        args["use_cpu_initialization"] = not torch.cuda.is_available()
    if trainer_cfg is not None:
        t = trainer_cfg
        args.update(
            tensor_model_parallel_size=t.tensor_parallel, pipeline_model_parallel_size=t.pipeline_parallel,
            expert_model_parallel_size=t.expert_parallel, context_parallel_size=t.context_parallel,
            sequence_parallel=t.sequence_parallel, num_layers_in_first_pipeline_stage=t.layers_in_first_pipeline_stage,
            num_layers_in_last_pipeline_stage=t.layers_in_last_pipeline_stage,
            cross_entropy_loss_fusion=t.cross_entropy_loss_fusion,
        )
    cls = DeepSeekV3Config if m.family == "deepseek_v3" else DeepSeekV2Config
    return cls(**args)
