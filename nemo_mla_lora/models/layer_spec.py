"""The Transformer-Engine-free MLA layer spec (CPU, and GPU machines without TE), and the TE spec's DeepSeek fix.

Substitutions in megatron-core's local spec (4 and 5 also in the TE spec):
1. ``MLASelfAttention`` passes ``k_channels`` / ``v_channels`` (q head dim nope+rope, v head dim) to its
   core attention, which the local ``DotProductAttention`` does not accept: ``MLADotProductAttention``
   accepts them and sizes its output by ``v_channels``.
2. ``MLASelfAttention`` with a column-parallel ``linear_kv_down_proj`` (the local spec) never sums the
   gradient of the shared rope key k_pe over the TP ranks: each rank's k_pe gradient covers only its
   own heads (without the fix, TP=2 adapter gradients before the last layer were off by up to 40% against TP=1).
   ``LocalMLASelfAttention`` makes that linear a ``KVDownProjection``, whose output is gathered over TP
   so that k_pe's gradient is all-reduced (or, under sequence parallelism, reduce-scattered by MLA's own
   sequence gather of k_pe), as with TE's duplicated down projection.
3. The local norm (``WrappedTorchNorm``) refuses sequence parallelism. ``SequenceParallelTorchNorm``
   builds the same ``torch.nn.RMSNorm``/``LayerNorm`` and, as apex's and TE's norms do, tags its weight
   ``sequence_parallel`` so Megatron's ``finalize_model_grads`` all-reduces its gradient across TP.
4. DeepSeek-V2's group-limited routing ranks expert groups by their best expert; Megatron's group-limited
   top-k by the sum of the top k/topk_group. ``DeepSeekMoELayer`` swaps in ``GroupMaxRouter`` where the
   config says ``moe_router_group_score='max'`` (``models/from_spec.group_score``).
5. DeepSeek's q/kv latent norms use eps 1e-6 whatever ``rms_norm_eps`` says (its modeling code, and
   transformers', build them with the default); Megatron uses ``layernorm_epsilon``. ``LatentNorm`` takes
   ``config.mla_latent_norm_eps`` (Moonlight: rms_norm_eps 1e-5, latent norms 1e-6).
   On the TE spec, where they are fused into q/kv up, ``latent_norm_te_linear`` does the same.
"""

import functools

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.torch_norm import WrappedTorchNorm


class MLADotProductAttention(DotProductAttention):
    """Local core attention for MLA: q/k head dim (nope+rope) differs from the v head dim.

    Runs through ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels on GPU, no
    [b, h, s, t] score tensor kept for backward) unless dropout, an attention bias or a non-vanilla
    softmax needs megatron's unfused path. A boolean mask (True = masked, Megatron's convention)
    becomes SDPA's keep-mask; no mask means causal."""

    def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
        super().__init__(*args, **kwargs)
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    def _sdpa_ok(self, attention_bias, packed_seq_params) -> bool:
        dropout = self.attention_dropout.p if self.training else 0.0
        return (
            dropout == 0.0
            and attention_bias is None
            and packed_seq_params is None
            and self.softmax_offset is None
            and self.config.window_size is None
            and not self.config.apply_query_key_layer_scaling
            and self.num_attention_heads_per_partition == self.num_query_groups_per_partition
        )

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        if not self._sdpa_ok(attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        s, b = query.shape[:2]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [s, b, h, d] -> [b, h, s, d]
        keep = None if attention_mask is None else ~attention_mask.bool()  # [b or 1, 1, s, t]
        causal = keep is None and s > 1 and self.attn_mask_type == AttnMaskType.causal
        context = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, is_causal=causal, scale=self.softmax_scale
        )  # [b, h, s, dv]
        return context.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)  # [s, b, h*dv]


class KVDownProjection(ColumnParallelLinear):
    """``linear_kv_down_proj`` whose [c_kv, k_pe] output is whole on every TP rank (see the module docstring).

    ``local_forward`` is the plain column-parallel forward (output rows sharded); ``finish_output`` turns
    that shard into the full output. An adapter wrapper adds its delta between the two."""

    def local_forward(self, x):
        return ColumnParallelLinear.forward(self, x)

    def finish_output(self, out_local: torch.Tensor) -> torch.Tensor:
        if self.tp_group.size() == 1:
            return out_local
        full = mappings.gather_from_tensor_model_parallel_region(out_local, group=self.tp_group)  # [s, b, c+dr]
        if self.sequence_parallel:  # MLA gathers k_pe over the sequence; its backward sums the heads' parts
            return mappings.scatter_to_sequence_parallel_region(full, group=self.tp_group)  # [s/tp, b, c+dr]
        rope = self.config.qk_pos_emb_head_dim
        c_kv, k_pe = full[..., :-rope], full[..., -rope:]
        return torch.cat([c_kv, mappings.copy_to_tensor_model_parallel_region(k_pe, group=self.tp_group)], dim=-1)

    def forward(self, x):
        out_local, bias = self.local_forward(x)
        return self.finish_output(out_local), bias


class LocalMLASelfAttention(MLASelfAttention):
    """MLA self-attention of the local spec, with ``KVDownProjection`` as its kv down projection."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if type(self.linear_kv_down_proj) is ColumnParallelLinear:  # mcore accepts only its own classes here
            self.linear_kv_down_proj.__class__ = KVDownProjection


class SequenceParallelTorchNorm:
    """``WrappedTorchNorm`` that also works under sequence parallelism (see the module docstring)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        norm_cls = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}.get(config.normalization)
        if norm_cls is None:
            raise ValueError(f"normalization={config.normalization!r}; expected RMSNorm or LayerNorm")
        norm = norm_cls(hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


class GroupMaxRouter(TopKRouter):
    """DeepSeek-V2's group_limited_greedy: softmax scores [n, E]; the topk_group groups with the best single
    expert are kept; the top-k experts among them, weights = their scores x the scaling factor (V2 does not
    renormalise). No load-balancing loss or token dropping: refused where configured."""

    def routing(self, logits: torch.Tensor):
        c = self.config
        if self.is_aux_loss_enabled() or c.moe_expert_capacity_factor is not None:
            raise ValueError(
                "group_limited_greedy routing (DeepSeek-V2) runs without aux loss and token dropping; "
                "set moe_aux_loss_coeff=0 and moe_expert_capacity_factor=None"
            )
        logits = logits.view(-1, c.num_moe_experts)  # [n, E]
        n, e, g = logits.shape[0], c.num_moe_experts, c.moe_router_num_groups
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [n, E]
        best = scores.view(n, g, e // g).amax(-1)  # [n, g]
        keep = torch.zeros_like(best).scatter(1, best.topk(c.moe_router_group_topk, dim=-1)[1], 1).bool()
        keep = keep[:, :, None].expand(n, g, e // g).reshape(n, e)  # [n, E]
        probs, top = scores.masked_fill(~keep, 0.0).topk(self.topk, dim=-1)  # [n, k]
        probs = (probs * (c.moe_router_topk_scaling_factor or 1.0)).type_as(logits)
        routing_probs = torch.zeros_like(logits).scatter(1, top, probs)
        routing_map = torch.zeros_like(logits, dtype=torch.int32).scatter(1, top, 1).bool()
        return routing_probs, routing_map


class DeepSeekMoELayer(MoELayer):
    """Megatron's ``MoELayer`` with ``GroupMaxRouter`` where DeepSeek-V2's group routing needs it."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if getattr(config, "moe_router_group_score", "sum") == "max":
            self.router.__class__ = GroupMaxRouter


class LatentNorm:
    """The q/kv latent norm with DeepSeek's own eps (``config.mla_latent_norm_eps``; see the module docstring)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        return SequenceParallelTorchNorm(config, hidden_size, getattr(config, "mla_latent_norm_eps", eps))


def _swap_norms(submodules) -> None:
    for name, value in vars(submodules).items():
        if value is WrappedTorchNorm:
            setattr(submodules, name, SequenceParallelTorchNorm)


def local_mla_block_spec(config, vp_stage=None, group_score=None, latent_norm_eps=None):
    """Decoder block spec (dense and MoE layers per ``moe_layer_freq``) without Transformer Engine.
    ``group_score`` / ``latent_norm_eps`` set the two DeepSeek settings a Megatron config has no field for (a NeMo
    checkpoint's context passes them here: its config class cannot hold them)."""
    if group_score is not None:
        config.moe_router_group_score = group_score
    if latent_norm_eps is not None:
        config.mla_latent_norm_eps = latent_norm_eps
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, vp_stage=vp_stage)
    for layer_spec in spec.layer_specs:
        layer_spec.submodules.self_attention.module = LocalMLASelfAttention
        layer_spec.submodules.self_attention.submodules.core_attention = MLADotProductAttention
        _swap_norms(layer_spec.submodules)
        if layer_spec.submodules.mlp.module is MoELayer:
            layer_spec.submodules.mlp.module = DeepSeekMoELayer
        _swap_norms(layer_spec.submodules.self_attention.submodules)
        attention = layer_spec.submodules.self_attention.submodules
        attention.q_layernorm = attention.kv_layernorm = LatentNorm
    if spec.layer_norm is WrappedTorchNorm:
        spec.layer_norm = SequenceParallelTorchNorm
    return spec


@functools.cache
def latent_norm_te_linear() -> type:
    """``TELayerNormColumnParallelLinear`` (TE's norm fused into q/kv up) with DeepSeek's latent-norm eps: Megatron
    builds it with ``layernorm_epsilon``, and TE's ``LayerNormLinear`` reads ``self.eps`` at every forward.
    Made on first use, not at import: without TE, Megatron's TE wrappers are mock stand-ins."""
    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear

    class LatentNormTELinear(TELayerNormColumnParallelLinear):
        def __init__(self, *args, config, **kwargs):
            super().__init__(*args, config=config, **kwargs)
            self.eps = getattr(config, "mla_latent_norm_eps", config.layernorm_epsilon)

    return LatentNormTELinear


def te_mla_block_spec(config, vp_stage=None, group_score=None, latent_norm_eps=None):
    """Megatron's Transformer Engine decoder block spec (what NeMo builds for DeepSeek) with DeepSeek-V2's group
    router where its routing needs it (``DeepSeekMoELayer``), and the q/kv latent norms TE fuses into
    ``linear_q_up_proj`` / ``linear_kv_up_proj`` run with DeepSeek's latent eps (``latent_norm_te_linear``; Megatron
    gives them ``layernorm_epsilon``: Moonlight 1e-5 where DeepSeek's code uses 1e-6)."""
    if group_score is not None:
        config.moe_router_group_score = group_score
    if latent_norm_eps is not None:
        config.mla_latent_norm_eps = latent_norm_eps
    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear

    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=True, vp_stage=vp_stage)
    latent_linear = latent_norm_te_linear()
    for layer_spec in spec.layer_specs:
        if layer_spec.submodules.mlp.module is MoELayer:
            layer_spec.submodules.mlp.module = DeepSeekMoELayer
        attention = layer_spec.submodules.self_attention.submodules
        for name in ("linear_q_up_proj", "linear_kv_up_proj"):
            if getattr(attention, name, None) is TELayerNormColumnParallelLinear:
                setattr(attention, name, latent_linear)
    return spec
