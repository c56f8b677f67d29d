"""The Transformer-Engine-free MLA layer spec (CPU, and GPU machines without TE).

megatron-core's local spec builds MLA with ``DotProductAttention``, but ``MLASelfAttention`` passes it
``k_channels`` / ``v_channels`` (q head dim nope+rope, v head dim), which the local core attention does
not accept. ``MLADotProductAttention`` accepts them and sizes its output by ``v_channels``.
"""

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention


class MLADotProductAttention(DotProductAttention):
    """Local core attention for MLA: q/k head dim (nope+rope) differs from the v head dim."""

    def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
        super().__init__(*args, **kwargs)
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition


def local_mla_block_spec(config, vp_stage=None):
    """Decoder block spec (dense and MoE layers per ``moe_layer_freq``) without Transformer Engine."""
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, vp_stage=vp_stage)
    for layer_spec in spec.layer_specs:
        layer_spec.submodules.self_attention.submodules.core_attention = MLADotProductAttention
    return spec
