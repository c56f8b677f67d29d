"""Tiny MLA + MoE models for tests and the default recipe, built through NeMo's ``DeepSeekV3Config``.

Every dimension is distinct where a transposed or mis-split tensor could hide:
hidden 80, q_lora_rank 56, kv_lora_rank 40 (+ rope 8 = 48 rows of linear_kv_down_proj), 4 heads,
qk_nope 24, qk_rope 8, v 28 (4*28 = 112 != hidden), dense FFN 120, expert FFN 36, two shared experts (72).
Layer 0 is dense, the rest MoE (6 routed experts, top-2, 2 groups, sigmoid router with expert bias),
as DeepSeek-V3 lays them out.
"""

import torch

from nemo_mla_lora.models.layer_spec import local_mla_block_spec

TINY_DIMS = dict(
    num_layers=3,
    hidden_size=80,
    ffn_hidden_size=120,
    num_attention_heads=4,
    q_lora_rank=56,
    kv_lora_rank=40,
    qk_head_dim=24,
    qk_pos_emb_head_dim=8,
    v_head_dim=28,
    num_moe_experts=6,
    moe_ffn_hidden_size=36,
    moe_shared_expert_intermediate_size=72,
    moe_router_topk=2,
    moe_router_num_groups=2,
    moe_router_group_topk=1,
    moe_router_topk_scaling_factor=2.5,
    original_max_position_embeddings=64,
    rotary_scaling_factor=4.0,
    seq_length=64,
    max_position_embeddings=64,
    vocab_size=264,
)

# What the CPU (and any TE-free machine) needs: no fusions, local experts, fp32 unless asked.
CPU_SAFE = dict(
    moe_grouped_gemm=False,
    moe_token_dispatcher_type="allgather",
    moe_shared_expert_overlap=False,
    moe_permute_fusion=False,
    moe_aux_loss_coeff=0.0,
    gradient_accumulation_fusion=False,
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    persist_layer_norm=False,
    apply_rope_fusion=False,
    cross_entropy_loss_fusion=False,
    async_tensor_model_parallel_allreduce=False,
    use_cpu_initialization=True,
    attention_softmax_in_fp32=True,
)


def mla_config(dtype: torch.dtype = torch.float32, **overrides):
    """A NeMo ``DeepSeekV3Config`` with the local (TE-free) layer spec; ``overrides`` win."""
    from nemo.collections.llm import DeepSeekV3Config

    num_layers = overrides.get("num_layers", TINY_DIMS["num_layers"])
    dense = "num_moe_experts" in overrides and not overrides["num_moe_experts"]
    args = dict(TINY_DIMS, **CPU_SAFE)
    args.update(
        moe_layer_freq=[0] * num_layers if dense else [0] + [1] * (num_layers - 1),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        transformer_layer_spec=local_mla_block_spec,
        init_method_std=0.02,
    )
    args.update(overrides)
    return DeepSeekV3Config(**args)


def tiny_mla_config(dtype: torch.dtype = torch.float32, **overrides):
    """DeepSeek-V3 style: q compression (linear_q_down_proj / linear_q_up_proj)."""
    return mla_config(dtype, **overrides)


def tiny_mla_noq_config(dtype: torch.dtype = torch.float32, **overrides):
    """DeepSeek-V2-Lite / Moonlight style: ``q_lora_rank=None`` (linear_q_proj)."""
    return mla_config(dtype, **dict(dict(q_lora_rank=None), **overrides))


def build_model(config, pre_process=None, post_process=None):
    """The Megatron-Core ``GPTModel`` for ``config`` (call after ``parallel.init_megatron``)."""
    model = config.configure_model(tokenizer=None, pre_process=pre_process, post_process=post_process)
    return model


def tiny_mla(dtype: torch.dtype = torch.float32, q_lora: bool = True, **overrides):
    config = tiny_mla_config(dtype, **overrides) if q_lora else tiny_mla_noq_config(dtype, **overrides)
    return build_model(config)
