"""An ``MLASpec`` (read from the checkpoint) -> NeMo's DeepSeek config (a Megatron-Core ``MLATransformerConfig``).

The one place the architecture becomes Megatron fields: dimensions, RoPE, routing, tied embeddings. Training
(both trainers), the engine and the tests build their models through it, so a model is configured from its
checkpoint and nothing else. Without Transformer Engine the TE-free layer spec and no fusions; with it Megatron's TE
spec as NeMo builds it, plus DeepSeek-V2's group router (``layer_spec.te_mla_block_spec``).
"""

import torch

from nemo_mla_lora.arch.mla_spec import MEGATRON_FIELDS, MLASpec

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


def megatron_routing(spec: MLASpec) -> dict:
    """Megatron router fields reproducing DeepSeek's routing exactly (see ``reference.model.route``).

    softmax + greedy, no renormalisation = Megatron's pre-softmax top-k; sigmoid + noaux_tc = sigmoid with
    expert bias (Megatron renormalises, as V3 does). V2's group_limited_greedy ranks groups by their best
    expert, Megatron by the sum of the top k/topk_group: equal when that is 1, else ``GroupMaxRouter``
    (``models/layer_spec.py``) replaces the router, flagged by ``moe_router_group_score='max'``."""
    if not spec.num_experts:
        return dict(
            num_moe_experts=None,
            moe_ffn_hidden_size=None,
            moe_shared_expert_intermediate_size=None,
            moe_router_num_groups=None,
            moe_router_group_topk=None,
            moe_router_topk_scaling_factor=None,
            moe_router_enable_expert_bias=False,
            moe_layer_freq=[0] * spec.num_layers,
        )
    grouped = spec.moe_topk_method != "greedy" and spec.moe_num_groups > 1
    return dict(
        num_moe_experts=spec.num_experts,
        moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=spec.shared_expert_ffn_hidden_size or None,
        moe_router_topk=spec.moe_topk,
        moe_router_num_groups=spec.moe_num_groups if grouped else None,
        moe_router_group_topk=spec.moe_group_topk if grouped else None,
        moe_router_topk_scaling_factor=spec.moe_scaling_factor,
        moe_router_score_function=spec.moe_score_function,
        moe_router_pre_softmax=spec.moe_score_function == "softmax",
        moe_router_enable_expert_bias=spec.moe_expert_bias,
        moe_layer_freq=list(spec.moe_layer_pattern),
    )


def group_score(spec: MLASpec) -> str:
    """'max' where Megatron's group-limited top-k (sum of top k/topk_group) differs from V2's (best expert)."""
    v2_grouped = spec.num_experts and spec.moe_topk_method == "group_limited_greedy" and spec.moe_num_groups > 1
    return "max" if v2_grouped and spec.moe_topk // spec.moe_group_topk != 1 else "sum"


def config_from_spec(spec: MLASpec, dtype: torch.dtype = torch.float32, **overrides):
    """NeMo ``DeepSeekV2Config`` / ``DeepSeekV3Config`` for ``spec`` (by its ``model_type``); ``overrides`` are
    Megatron fields that win (parallel layout, sequence length, fusions; tests shrink models with them)."""
    from nemo.collections.llm import DeepSeekV2Config, DeepSeekV3Config

    from nemo_mla_lora.models.layer_spec import local_mla_block_spec, te_mla_block_spec
    from nemo_mla_lora.runtime import te_compat

    args = {theirs: getattr(spec, ours) for ours, theirs in MEGATRON_FIELDS.items()}
    args.update(megatron_routing(spec))
    args.update(
        seq_length=spec.rope_original_max_positions,
        max_position_embeddings=spec.max_positions,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        moe_aux_loss_coeff=0.0,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        init_method_std=0.02,
    )
    if te_compat.apply():  # Transformer Engine absent: its shims, the local spec, no fusions
        args.update(
            CPU_SAFE, transformer_layer_spec=local_mla_block_spec, use_cpu_initialization=not torch.cuda.is_available()
        )
    else:  # NeMo's TE spec, with DeepSeek-V2's group router where needed
        args.update(transformer_layer_spec=te_mla_block_spec)
        if not te_compat.apex_wgrad_fusion_available():  # NeMo's default needs Apex's kernel (every NeMo container)
            args.update(gradient_accumulation_fusion=False)
    args.update(overrides)
    cls = DeepSeekV2Config if spec.model_type == "deepseek_v2" else DeepSeekV3Config
    config = cls(**args)
    config.moe_router_group_score = group_score(spec)  # read by layer_spec.DeepSeekMoELayer
    config.mla_latent_norm_eps = spec.latent_norm_eps  # read by layer_spec.LatentNorm
    return config
